"""The prep run: corpus scan → parallel features → TFRecord shards + metadata, resumable.

:func:`prepare` is the Python API behind ``python -m data_prep``. One run:

1. scans the corpus (:mod:`data_prep.sources`) into utterances sorted by id;
2. assigns utterance ``i`` to shard ``i % num_shards`` (deterministic, independent of workers);
3. checks the output folder: a finished run with the same fingerprint is returned as is, an
   interrupted one is resumed, one with a different configuration is refused (``overwrite``
   replaces it);
4. streams utterances through a process pool (ordered results, bounded look-ahead, so memory
   does not grow with the corpus), each worker loading the audio, computing whole-utterance
   features once and serialising both segment layouts ("train" hop 1.0 s, "eval" hop 0.4 s);
5. writes each shard to ``.prep/`` and moves it into place when complete, with a completion
   marker (utterance rows, skipped files, SHA-256) that makes the run resumable shard by shard;
6. writes the TFDS metadata (dataset_info.json, features.json) and, last, metadata.json.

Output bytes depend only on the input files and the options: two runs, or an interrupted run
and its resumption, give byte-identical folders, whatever ``workers`` is.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from data_prep import sources
from data_prep.sources import PrepError, Scan, Utterance
from dkd_jax import audio, records

log = logging.getLogger("data_prep")

STATE_DIR = ".prep"
UTTERANCES_PER_SHARD = 256
MAX_SHARDS = 1024
_CHUNK = 4  # utterances per pool task


# --------------------------------------------------------------------------------------------
# Feature worker
# --------------------------------------------------------------------------------------------

_worker_state: dict = {}


def _init_worker(cfg_dict: dict, corpus: str, pool_worker: bool = False) -> None:
    if pool_worker:
        # Ctrl-C reaches the whole process group: the main process handles it (stops the pool,
        # keeps finished shards); workers just finish their current chunk, quietly.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_state["cfg"] = audio.FeatureConfig.from_dict(cfg_dict)
    _worker_state["corpus"] = corpus
    import librosa  # noqa: F401  (pay the import once per worker)


def _layout_blob(
    feats: np.ndarray, utt: Utterance, cfg, corpus: str, *, hop_seconds: float, valid: int
) -> tuple[bytes, int]:
    segments, valid_frames = audio.segment_features(
        feats, cfg, hop_seconds=hop_seconds, num_valid_frames=valid
    )
    parts = []
    for k in range(segments.shape[0]):
        payload = records.encode_segment(
            segments[k],
            label=utt.label,
            utterance_id=utt.utterance_id,
            segment_index=k,
            valid_frames=int(valid_frames[k]),
            speaker=utt.speaker,
            session=utt.session,
            gender=utt.gender,
            corpus=corpus,
        )
        parts.append(records.frame_record(payload))
    return b"".join(parts), len(parts)


def _process_utterance(utt: Utterance) -> tuple:
    """Features + framed records of one utterance (runs in a worker).

    Returns:
      ("ok", row dict, train bytes, n_train, eval bytes, n_eval) or ("skip", kind, reason).
    """
    cfg: audio.FeatureConfig = _worker_state["cfg"]
    corpus: str = _worker_state["corpus"]
    try:
        wave = audio.load_audio(utt.path, sample_rate=cfg.sample_rate)
    except audio.AudioError as e:
        return ("skip", e.kind, e.reason)
    duration = wave.shape[0] / cfg.sample_rate
    short = wave.shape[0] < cfg.window_samples
    if short and cfg.short_utterances == "drop":
        return (
            "skip",
            "short_dropped",
            f"shorter than one window ({duration:.3f} s < {cfg.window_seconds} s), "
            "dropped (short_utterances='drop')",
        )
    padded, valid = audio.pad_to_window(wave, cfg)
    feats = audio.compute_features(padded, cfg)
    train, n_train = _layout_blob(
        feats, utt, cfg, corpus, hop_seconds=cfg.train_hop_seconds, valid=valid
    )
    evals, n_eval = _layout_blob(
        feats, utt, cfg, corpus, hop_seconds=cfg.eval_hop_seconds, valid=valid
    )
    row = {
        "utterance_id": utt.utterance_id,
        "label": utt.label,
        "label_name": utt.label_name,
        "source_label": utt.source_label,
        "speaker": utt.speaker,
        "session": utt.session,
        "gender": utt.gender,
        "dialog": utt.dialog,
        "duration_s": round(duration, 6),
        "num_train_segments": n_train,
        "num_eval_segments": n_eval,
        "padded": bool(short),
        "path": utt.rel_path,
    }
    return ("ok", row, train, n_train, evals, n_eval)


def _process_chunk(chunk: list[Utterance]) -> list[tuple]:
    return [_process_utterance(u) for u in chunk]


def _mp_context():
    # fork is cheapest (workers inherit imported librosa) but unsafe once JAX or TensorFlow
    # started their thread pools in this process; spawn is always safe.
    methods = multiprocessing.get_all_start_methods()
    threaded = any(m in sys.modules for m in ("jax", "tensorflow", "torch"))
    if "fork" in methods and not threaded:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _ordered_results(
    utterances: list[Utterance], cfg: audio.FeatureConfig, corpus: str, workers: int
) -> Iterator[tuple]:
    """Processes utterances in order; at most ~4 chunks per worker in flight (bounded memory)."""
    if workers <= 1:
        _init_worker(cfg.to_dict(), corpus)
        for u in utterances:
            yield _process_utterance(u)
        return
    chunks = [utterances[i : i + _CHUNK] for i in range(0, len(utterances), _CHUNK)]
    ex = cf.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=_mp_context(),
        initializer=_init_worker,
        initargs=(cfg.to_dict(), corpus, True),
    )
    try:
        pending: collections.deque = collections.deque()
        it = iter(chunks)
        for chunk in it:
            pending.append(ex.submit(_process_chunk, chunk))
            if len(pending) >= 4 * workers:
                break
        while pending:
            results = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(ex.submit(_process_chunk, nxt))
            yield from results
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def resolve_feature_config(feature_config) -> audio.FeatureConfig:
    """None → logmel40; a preset name, a dict or a FeatureConfig."""
    if feature_config is None:
        return audio.FEATURE_PRESETS["logmel40"]
    if isinstance(feature_config, audio.FeatureConfig):
        return feature_config
    if isinstance(feature_config, str):
        if feature_config not in audio.FEATURE_PRESETS:
            raise PrepError(
                f"unknown feature preset {feature_config!r}; choose from "
                f"{sorted(audio.FEATURE_PRESETS)}"
            )
        return audio.FEATURE_PRESETS[feature_config]
    if isinstance(feature_config, dict):
        return audio.FeatureConfig.from_dict(feature_config)
    raise PrepError(
        f"feature_config must be a FeatureConfig, preset name or dict, got {feature_config!r}"
    )


def shard_file(name: str, split: str, index: int, count: int) -> str:
    """TFDS shard naming: ``<name>-<split>.tfrecord-0000i-of-0000n``."""
    return f"{name}-{split}.tfrecord-{index:05d}-of-{count:05d}"


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _is_artifact(name: str) -> bool:
    return (
        name in (records.METADATA_FILE, "dataset_info.json", "features.json", STATE_DIR)
        or name.endswith(".labels.txt")
        or ".tfrecord-" in name
    )


def _clear_artifacts(out_dir: str) -> None:
    for name in os.listdir(out_dir):
        if _is_artifact(name):
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def _config_diff(old: dict, new: dict) -> str:
    diffs = []
    for group in ("feature_config", "source", "num_shards", "corpus"):
        a, b = old.get(group), new.get(group)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if k not in ("root", "manifest") and a.get(k) != b.get(k):
                    diffs.append(f"{group}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
        elif a != b:
            diffs.append(f"{group}: {a!r} -> {b!r}")
    if not diffs and old.get("inputs_hash") != new.get("inputs_hash"):
        diffs.append("the input files changed")
    return "; ".join(diffs[:6]) or "different fingerprint"


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="utt",
        disable=not (enabled and sys.stderr.isatty()),
        dynamic_ncols=True,
        leave=False,
    )


# Called after each shard is complete (tests use it to simulate an interruption).
_on_shard_done: Callable[[int], None] | None = None


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def scan(source: str, **source_options) -> Scan:
    """Runs the reader of ``source`` ("iemocap", "emodb", "csv") with its options."""
    if source not in sources.SCANNERS:
        raise PrepError(f"unknown source {source!r}; choose from {sorted(sources.SCANNERS)}")
    opts = dict(source_options)
    key = "manifest" if source == "csv" else "root"
    if key not in opts or opts[key] is None:
        raise PrepError(f"source {source!r} needs {key}=...")
    try:
        return sources.SCANNERS[source](opts.pop(key), **opts)
    except TypeError as e:
        raise PrepError(f"bad options for source {source!r}: {e}") from None


def prepare(
    source: str,
    *,
    out_dir: str | os.PathLike,
    feature_config: audio.FeatureConfig | str | dict | None = None,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    num_shards: int | None = None,
    **source_options,
) -> dict:
    """Prepares a corpus into a prep dir of TFRecord shards (see :mod:`dkd_jax.records`).

    Args:
      source: "iemocap" (root=, dialogs="all"|"improvised"|"scripted", happy="exc"|"hap+exc"|
        "hap", classes=), "emodb" (root=, classes=) or "csv" (manifest=, classes=, corpus=).
      out_dir: the prep dir (created; resumed if it holds an interrupted run of the same
        configuration; refused if it holds a different one, unless ``overwrite``).
      feature_config: FeatureConfig, preset name ("logmel40" default, "logmel64", "logmel128",
        "mfcc26") or dict.
      workers: feature processes (default: CPU count; 1 = in this process).
      progress: show a tqdm bar (only on a terminal).
      overwrite: replace a prep run with a different configuration in ``out_dir``.
      num_shards: shards per split (default ceil(utterances / 256), at most 1024).
      **source_options: passed to the reader.

    Returns:
      The metadata dict (also written to ``out_dir/metadata.json``).

    Raises:
      PrepError: bad options, an unusable corpus (nothing left, with the reasons), or an output
        folder that holds something else.
    """
    cfg = resolve_feature_config(feature_config)
    found = scan(source, **source_options)
    root_key = "manifest" if source == "csv" else "root"
    root_value = os.path.abspath(os.fspath(source_options[root_key]))
    utts = found.utterances
    if not utts:
        raise PrepError(_nothing_left_message(root_value, found, 0, []))
    if num_shards is None:
        num_shards = min(MAX_SHARDS, max(1, math.ceil(len(utts) / UTTERANCES_PER_SHARD)))
    num_shards = int(num_shards)
    if num_shards < 1:
        raise PrepError(f"num_shards must be >= 1, got {num_shards}")
    num_shards = min(num_shards, len(utts))
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))

    inputs = [
        (u.utterance_id, u.rel_path, os.path.getsize(u.path), u.label, u.speaker, u.session)
        for u in utts
    ]
    inputs_hash = hashlib.sha256(_canonical(inputs)).hexdigest()
    identity = {
        "format_version": records.FORMAT_VERSION,
        "corpus": found.corpus,
        "source": {"kind": source, **found.options},
        "feature_config": cfg.to_dict(),
        "num_shards": num_shards,
        "inputs_hash": inputs_hash,
    }
    fingerprint = hashlib.sha256(_canonical(identity)).hexdigest()

    out_dir = os.path.abspath(os.fspath(out_dir))
    state_dir = os.path.join(out_dir, STATE_DIR)
    resumed = _claim_out_dir(out_dir, identity, fingerprint, overwrite)
    if resumed == "done":
        log.info("%s already holds this prep run; nothing to do", out_dir)
        return records.load_metadata(out_dir)
    os.makedirs(state_dir, exist_ok=True)
    _write_json(os.path.join(state_dir, "state.json"), {**identity, "fingerprint": fingerprint})

    # ---- shards ------------------------------------------------------------------------
    shards = [utts[j::num_shards] for j in range(num_shards)]
    done = {}
    for j in range(num_shards):
        marker = os.path.join(state_dir, f"shard-{j:05d}.json")
        if os.path.exists(marker):
            info = _read_json(marker)
            ok = all(
                os.path.exists(os.path.join(out_dir, f["name"]))
                and os.path.getsize(os.path.join(out_dir, f["name"])) == f["num_bytes"]
                for f in info["files"].values()
            )
            if ok:
                done[j] = info
    pending = [j for j in range(num_shards) if j not in done]
    if done:
        log.info("resuming %s: %d of %d shards already complete", out_dir, len(done), num_shards)
    stream = [u for j in pending for u in shards[j]]
    bar = _progress(len(stream), progress, f"prep {found.corpus}")
    results = _ordered_results(stream, cfg, found.corpus, workers)
    try:
        for j in pending:
            done[j] = _write_shard(
                j, shards[j], results, out_dir, state_dir, found.corpus, num_shards, bar
            )
            if _on_shard_done is not None:
                _on_shard_done(j)
    finally:
        results.close()
        bar.close()

    # ---- metadata ----------------------------------------------------------------------
    meta = _finalize(out_dir, found, cfg, identity, fingerprint, root_value, done, num_shards)
    shutil.rmtree(state_dir, ignore_errors=True)
    return meta


def _claim_out_dir(out_dir: str, identity: dict, fingerprint: str, overwrite: bool) -> str:
    """Returns "new", "resume" or "done"; refuses folders holding another run or other files."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PrepError(f"--out {out_dir} exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, records.METADATA_FILE)
    state_path = os.path.join(out_dir, STATE_DIR, "state.json")
    previous = None
    if os.path.exists(meta_path):
        try:
            previous, kind = _read_json(meta_path), "finished"
        except (OSError, json.JSONDecodeError):
            previous, kind = {}, "unreadable"
    elif os.path.exists(state_path):
        try:
            previous, kind = _read_json(state_path), "interrupted"
        except (OSError, json.JSONDecodeError):
            previous, kind = {}, "unreadable"
    if previous is not None:
        if previous.get("fingerprint") == fingerprint and not overwrite:
            return "done" if kind == "finished" else "resume"
        if not overwrite:
            raise PrepError(
                f"{out_dir} holds a{'n' if kind[0] in 'aeiou' else ''} {kind} prep run with a "
                f"different configuration ({_config_diff(previous, identity)}); pass --overwrite "
                "(overwrite=True) to replace it, or choose another --out folder"
            )
        _clear_artifacts(out_dir)
        return "new"
    foreign = [n for n in os.listdir(out_dir) if not _is_artifact(n)]
    stray = [n for n in os.listdir(out_dir) if _is_artifact(n)]
    if stray:
        if not overwrite:
            raise PrepError(
                f"{out_dir} holds prep files ({', '.join(sorted(stray)[:3])}) but no "
                "metadata.json; "
                "pass --overwrite to replace them, or choose another --out folder"
            )
        _clear_artifacts(out_dir)
    if foreign and not overwrite:
        raise PrepError(
            f"{out_dir} is not empty ({', '.join(sorted(foreign)[:3])}...) and holds no prep run; "
            "choose an empty or new --out folder (or pass --overwrite to write next to them)"
        )
    return "new"


def _write_shard(
    j: int,
    shard: list[Utterance],
    results: Iterator[tuple],
    out_dir: str,
    state_dir: str,
    corpus: str,
    num_shards: int,
    bar,
) -> dict:
    """Consumes the results of one shard's utterances; writes both layouts; returns its marker."""
    names = {s: shard_file(corpus, s, j, num_shards) for s in records.SPLITS}
    tmp = {s: os.path.join(state_dir, names[s] + ".tmp") for s in records.SPLITS}
    files = {s: open(tmp[s], "wb") for s in records.SPLITS}
    digests = {s: hashlib.sha256() for s in records.SPLITS}
    lengths = dict.fromkeys(records.SPLITS, 0)
    rows, skipped = [], []
    try:
        for utt in shard:
            res = next(results)
            if res[0] == "skip":
                _, kind, reason = res
                skipped.append(
                    {
                        "path": utt.rel_path,
                        "utterance_id": utt.utterance_id,
                        "kind": kind,
                        "reason": reason,
                    }
                )
            else:
                _, row, train, n_train, evals, n_eval = res
                for split, blob, n in (("train", train, n_train), ("eval", evals, n_eval)):
                    files[split].write(blob)
                    digests[split].update(blob)
                    lengths[split] += n
                rows.append(row)
            bar.update(1)
    finally:
        for f in files.values():
            f.close()
    info = {"shard": j, "files": {}, "rows": rows, "skipped": skipped}
    for s in records.SPLITS:
        final = os.path.join(out_dir, names[s])
        os.replace(tmp[s], final)
        info["files"][s] = {
            "name": names[s],
            "num_records": lengths[s],
            "num_bytes": os.path.getsize(final),
            "sha256": digests[s].hexdigest(),
        }
    _write_json(os.path.join(state_dir, f"shard-{j:05d}.json"), info)
    return info


def _nothing_left_message(root: str, found: Scan, candidates: int, skipped: list[dict]) -> str:
    kinds = collections.Counter(s["kind"] for s in list(found.skipped) + list(skipped))
    parts = [f"{n} {k}" for k, n in sorted(kinds.items())]
    parts += [f"{n} excluded ({k})" for k, n in found.excluded.items()]
    first = (list(skipped) + list(found.skipped))[:3]
    examples = "; ".join(f"{s['path']}: {s['reason']}" for s in first)
    return (
        f"nothing usable left in {root}: {candidates} candidate utterance(s) in classes "
        f"{found.label_names}"
        + (f"; {', '.join(parts)}" if parts else "")
        + (f". e.g. {examples}" if examples else "")
    )


def _counter(rows: Iterable[dict], key: str) -> dict:
    return dict(sorted(collections.Counter(r[key] for r in rows).items()))


def _finalize(
    out_dir: str,
    found: Scan,
    cfg: audio.FeatureConfig,
    identity: dict,
    fingerprint: str,
    root_value: str,
    done: dict,
    num_shards: int,
) -> dict:
    rows = sorted(
        (r for j in range(num_shards) for r in done[j]["rows"]), key=lambda r: r["utterance_id"]
    )
    late_skips = [s for j in range(num_shards) for s in done[j]["skipped"]]
    if not rows:
        msg = _nothing_left_message(root_value, found, len(found.utterances), late_skips)
        _clear_artifacts(out_dir)
        raise PrepError(msg)
    skipped = sorted(found.skipped + late_skips, key=lambda s: (s["path"], s["utterance_id"]))
    label_names = found.label_names
    splits = {}
    for s in records.SPLITS:
        files = [done[j]["files"][s] for j in range(num_shards)]
        splits[s] = {
            "hop_seconds": cfg.train_hop_seconds if s == "train" else cfg.eval_hop_seconds,
            "num_segments": sum(f["num_records"] for f in files),
            "files": [f["name"] for f in files],
            "shard_lengths": [f["num_records"] for f in files],
            "num_bytes": sum(f["num_bytes"] for f in files),
            "sha256": [f["sha256"] for f in files],
        }
    seg_by_class = {}
    for s in records.SPLITS:
        key = "num_train_segments" if s == "train" else "num_eval_segments"
        c = collections.Counter()
        for r in rows:
            c[r["label_name"]] += r[key]
        seg_by_class[s] = {n: c.get(n, 0) for n in label_names}
    by_class = collections.Counter(r["label_name"] for r in rows)
    counts = {
        "candidates": len(found.utterances),
        "utterances": len(rows),
        "segments": {s: splits[s]["num_segments"] for s in records.SPLITS},
        "duration_s": round(sum(r["duration_s"] for r in rows), 3),
        "by_class": {n: by_class.get(n, 0) for n in label_names},
        "by_session": _counter(rows, "session"),
        "by_speaker": _counter(rows, "speaker"),
        "by_gender": _counter(rows, "gender"),
        "by_dialog": _counter(rows, "dialog"),
        "segments_by_class": seg_by_class,
        "short_padded": sum(1 for r in rows if r["padded"]),
        "short_dropped": sum(1 for s in late_skips if s["kind"] == "short_dropped"),
        "excluded": dict(found.excluded),
        "skipped": dict(sorted(collections.Counter(s["kind"] for s in skipped).items())),
    }
    content = hashlib.sha256()
    for s in records.SPLITS:
        for name, digest in zip(splits[s]["files"], splits[s]["sha256"], strict=True):
            content.update(f"{name} {digest}\n".encode())
    content.update(_canonical({"feature_config": cfg.to_dict(), "label_names": label_names}))
    content.update(_canonical(rows))
    meta = {
        "format_version": records.FORMAT_VERSION,
        "corpus": found.corpus,
        "dataset_name": found.corpus,
        "source": {
            "kind": identity["source"]["kind"],
            ("manifest" if identity["source"]["kind"] == "csv" else "root"): root_value,
            **found.options,
        },
        "feature_config": cfg.to_dict(),
        "segment_shape": list(cfg.segment_shape),
        "frames_per_window": cfg.frames_per_window,
        "label_names": label_names,
        "num_classes": len(label_names),
        "num_shards": num_shards,
        "splits": splits,
        "counts": counts,
        "content_hash": "sha256:" + content.hexdigest(),
        "fingerprint": fingerprint,
        "inputs_hash": identity["inputs_hash"],
        "skipped": skipped,
        "utterances": rows,
    }
    _write_tfds_metadata(out_dir, found, cfg, splits)
    _write_json(os.path.join(out_dir, records.METADATA_FILE), meta)
    return meta


def _write_tfds_metadata(out_dir: str, found: Scan, cfg: audio.FeatureConfig, splits: dict):
    """dataset_info.json / features.json so ``tfds.builder_from_directory(out_dir)`` works."""
    logging.getLogger("absl").setLevel(logging.ERROR)  # "TensorFlow not found" shim notices
    import tensorflow_datasets as tfds

    features = records.tfds_features(cfg.segment_shape, found.label_names)
    split_infos = [
        tfds.core.SplitInfo(
            name=s,
            shard_lengths=list(splits[s]["shard_lengths"]),
            num_bytes=int(splits[s]["num_bytes"]),
        )
        for s in sorted(splits)
    ]
    hop = ", ".join(f"{s}: hop {splits[s]['hop_seconds']} s" for s in sorted(splits))
    tfds.folder_dataset.write_metadata(
        data_dir=out_dir,
        features=features,
        split_infos=split_infos,
        check_data=False,
        description=(
            f"{found.corpus} speech-emotion segments prepared by dkd-jax data_prep: "
            f"{cfg.kind} features {list(cfg.segment_shape)} per {cfg.window_seconds} s window "
            f"({hop}); labels {found.label_names}. See metadata.json."
        ),
    )


def prep_summary(meta: dict) -> str:
    """A few human-readable lines about a finished prep run."""
    c = meta["counts"]
    lines = [
        f"{meta['corpus']}: {c['utterances']} utterances ({c['duration_s'] / 3600:.2f} h), "
        f"segments train {c['segments']['train']} / eval {c['segments']['eval']}, "
        f"shape {meta['segment_shape']}, {meta['num_shards']} shard(s) per split",
        "  by class: " + ", ".join(f"{k} {v}" for k, v in c["by_class"].items()),
        "  by session: " + ", ".join(f"{k} {v}" for k, v in c["by_session"].items()),
        f"  short utterances: {c['short_padded']} padded, {c['short_dropped']} dropped",
    ]
    if c["excluded"]:
        lines.append("  excluded: " + ", ".join(f"{k} {v}" for k, v in c["excluded"].items()))
    if c["skipped"]:
        lines.append(
            "  skipped: "
            + ", ".join(f"{k} {v}" for k, v in c["skipped"].items())
            + " (each listed with its reason in metadata.json)"
        )
    lines.append(f"  content hash {meta['content_hash']}")
    return "\n".join(lines)


__all__ = [
    "PrepError",
    "prep_summary",
    "prepare",
    "resolve_feature_config",
    "scan",
    "shard_file",
]
