"""The prep run: corpus scan → parallel features → TFRecord shards + metadata, resumable.

:func:`prepare` is the Python API behind ``python -m data_prep``. One run:

1. scans the corpus (:mod:`data_prep.sources`, :mod:`data_prep.manifest`) into utterances
   sorted by id;
2. assigns utterance ``i`` to shard ``i % num_shards`` (deterministic, independent of workers);
3. checks the output folder: a finished run with the same fingerprint is returned as is, an
   interrupted one is resumed, one with a different configuration, or a finished one whose
   input files now hold other bytes (``INPUTS_FILE``), is refused (``overwrite`` replaces it);
4. streams utterances through the feature workers (:mod:`data_prep.workers`: ordered results,
   bounded look-ahead, workers that die with their parent), each computing whole-utterance
   features once and serialising both segment layouts ("train" hop 1.0 s, "eval" hop 0.4 s);
5. writes each shard to ``.prep/`` and moves it into place when complete, with a completion
   marker (utterance rows, skipped files, SHA-256) that makes the run resumable shard by shard;
   Ctrl-C and SIGTERM stop the workers and keep the finished shards;
6. writes the TFDS metadata (dataset_info.json, features.json), the inputs' SHA-256
   (``inputs.sha256``) and, last, metadata.json, with
   the segment balance (utterances supplying more than ``max_utterance_share`` of the "train"
   segments, and over twice an even share, are named and warned about;
   ``max_segments_per_utterance`` caps them).

Output bytes depend only on the input files and the options: two runs, or an interrupted run
and its resumption, give byte-identical folders, whatever ``workers`` is. OS errors (read-only
or full output folder) surface as :class:`OSError` naming the file.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator

from data_prep import inputs as input_files
from data_prep import manifest, sources
from data_prep import workers as feature_workers
from data_prep.inputs import INPUTS_FILE
from data_prep.sources import PrepError, Scan
from dkd_jax import audio, records

log = logging.getLogger("data_prep")

STATE_DIR = ".prep"
UTTERANCES_PER_SHARD = 256
MAX_SHARDS = 1024
DEFAULT_MAX_UTTERANCE_SHARE = 0.1
"""Warn when one utterance supplies more than this share of the "train" segments."""

SCANNERS = {
    "iemocap": sources.scan_iemocap,
    "emodb": sources.scan_emodb,
    "csv": manifest.scan_csv,
}


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


def is_artifact(name: str) -> bool:
    """Whether a prep folder's entry ``name`` is one of the files a prep run writes."""
    return (
        name
        in (records.METADATA_FILE, INPUTS_FILE, "dataset_info.json", "features.json", STATE_DIR)
        or name.endswith(".labels.txt")
        or ".tfrecord-" in name
    )


def clear_artifacts(out_dir: str) -> None:
    """Deletes a prep run's files from ``out_dir`` (:func:`is_artifact`); nothing else."""
    for name in os.listdir(out_dir):
        if is_artifact(name):
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def _config_diff(old: dict, new: dict) -> str:
    diffs = []
    for group in ("feature_config", "source", "num_shards", "corpus", "max_segments_per_utterance"):
        a, b = old.get(group), new.get(group)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if k not in ("root", "manifest") and a.get(k) != b.get(k):
                    diffs.append(f"{group}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
        elif a != b:
            diffs.append(f"{group}: {a!r} -> {b!r}")
    if not diffs and old.get("inputs_hash") != new.get("inputs_hash"):
        diffs.append(
            "the inputs changed: a file (its path or size), or a row's label, speaker, session "
            "or utterance id"
        )
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
    if source not in SCANNERS:
        raise PrepError(f"unknown source {source!r}; choose from {sorted(SCANNERS)}")
    opts = dict(source_options)
    key = "manifest" if source == "csv" else "root"
    if key not in opts or opts[key] is None:
        raise PrepError(f"source {source!r} needs {key}=...")
    try:
        return SCANNERS[source](opts.pop(key), **opts)
    except TypeError as e:
        raise PrepError(f"bad options for source {source!r}: {e}") from None


def _refuse_unreadable(utts) -> None:
    """Stops before any work when this user may not read some of the audio (``PrepError``
    naming them). Such a file is not a bad recording, to be skipped and counted like a cut
    one: the run would silently train on less until the permissions are fixed. Other open
    errors are left to the workers, which skip the file with its reason."""
    denied = []
    for u in utts:
        try:
            with open(u.path, "rb"):
                pass
        except PermissionError:
            denied.append(u.path)
        except OSError:
            continue
    if denied:
        listed = ", ".join(denied[:3]) + (", ..." if len(denied) > 3 else "")
        raise PrepError(
            f"{len(denied)} audio file(s) cannot be read by this user (Permission denied): "
            f"{listed}; fix their permissions, or run data_prep as a user who may read them"
        )


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_balance_options(cap, share) -> tuple[int | None, float]:
    if cap is not None and not _positive_int(cap):
        raise PrepError(f"max_segments_per_utterance must be a positive integer, got {cap!r}")
    if not isinstance(share, int | float) or not 0 < float(share) <= 1:
        raise PrepError(f"max_utterance_share must be in (0, 1], got {share!r}")
    return cap, float(share)


def _identity(source: str, found: Scan, cfg, num_shards: int, cap: int | None) -> dict:
    inputs = [
        (u.utterance_id, u.rel_path, os.path.getsize(u.path), u.label, u.speaker, u.session)
        for u in found.utterances
    ]
    identity = {
        "format_version": records.FORMAT_VERSION,
        "corpus": found.corpus,
        "source": {"kind": source, **found.options},
        "feature_config": cfg.to_dict(),
        "num_shards": num_shards,
        "inputs_hash": hashlib.sha256(_canonical(inputs)).hexdigest(),
    }
    if cap is not None:  # only then: runs without a cap keep their earlier fingerprint
        identity["max_segments_per_utterance"] = cap
    return identity


def prepare(
    source: str,
    *,
    out_dir: str | os.PathLike,
    feature_config: audio.FeatureConfig | str | dict | None = None,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    num_shards: int | None = None,
    max_segments_per_utterance: int | None = None,
    max_utterance_share: float = DEFAULT_MAX_UTTERANCE_SHARE,
    **source_options,
) -> dict:
    """Prepares a corpus into a prep dir of TFRecord shards (see :mod:`dkd_jax.records`).

    Args:
      source: "iemocap" (root=, dialogs="all"|"improvised"|"scripted", happy="exc"|"hap+exc"|
        "hap", classes=), "emodb" (root=, classes=) or "csv" (manifest=, classes=, corpus=,
        label_map=, exclude_labels=, ignore_unknown_labels=, duplicates=; see
        :func:`data_prep.manifest.scan_csv`).
      out_dir: the prep dir (created; resumed if it holds an interrupted run of the same
        configuration; refused if it holds a different one, unless ``overwrite``).
      feature_config: FeatureConfig, preset name ("logmel40" default, "logmel64", "logmel128",
        "mfcc26") or dict.
      workers: feature processes (default: the usable CPUs, at most one per 4 utterances;
        1 = in this process).
      progress: show a tqdm bar (only on a terminal).
      overwrite: replace a prep run with a different configuration in ``out_dir``.
      num_shards: shards per split (default ceil(utterances / 256), at most 1024).
      max_segments_per_utterance: keep at most this many "train" windows of an utterance,
        spread evenly over it (default: all). The "eval" layout keeps every window.
      max_utterance_share: warn about (and list in metadata.json) utterances supplying more
        than this share of the "train" segments, and more than twice an even share
        (default 0.1).
      **source_options: passed to the reader.

    Returns:
      The metadata dict (also written to ``out_dir/metadata.json``).

    Raises:
      PrepError: bad options, an unusable corpus (nothing left, with the reasons), or an output
        folder that holds something else.
      OSError: the output folder cannot be written (read-only, no space left); names the file.
      workers.Terminated: SIGTERM (a KeyboardInterrupt: the finished shards are kept).
    """
    if workers is not None and not _positive_int(workers):
        raise PrepError(f"workers must be a positive integer, got {workers!r}")
    cfg = resolve_feature_config(feature_config)
    cap, share = _check_balance_options(max_segments_per_utterance, max_utterance_share)
    found = scan(source, **source_options)
    root_value = os.path.abspath(
        os.fspath(source_options["manifest" if source == "csv" else "root"])
    )
    utts = found.utterances
    if not utts:
        raise PrepError(_nothing_left_message(root_value, found, 0, []))
    _refuse_unreadable(utts)
    if num_shards is None:
        num_shards = min(MAX_SHARDS, max(1, math.ceil(len(utts) / UTTERANCES_PER_SHARD)))
    if int(num_shards) < 1:
        raise PrepError(f"num_shards must be >= 1, got {num_shards}")
    num_shards = min(int(num_shards), len(utts))
    identity = _identity(source, found, cfg, num_shards, cap)
    fingerprint = hashlib.sha256(_canonical(identity)).hexdigest()

    out_dir = os.path.abspath(os.fspath(out_dir))
    state_dir = os.path.join(out_dir, STATE_DIR)
    with feature_workers.stop_on_signals():
        inputs = [(u.rel_path, u.path) for u in utts]
        if _claim_out_dir(out_dir, identity, fingerprint, overwrite, inputs) == "done":
            log.info("%s already holds this prep run; nothing to do", out_dir)
            return records.load_metadata(out_dir)
        os.makedirs(state_dir, exist_ok=True)
        state = {**identity, "fingerprint": fingerprint, "front_end": audio.FRONT_END_VERSION}
        _write_json(os.path.join(state_dir, "state.json"), state)
        done = _completed_shards(out_dir, state_dir, num_shards)
        run = _ShardRun(out_dir, state_dir, found.corpus, num_shards, utts)
        run.write_pending(done, cfg, workers, cap, progress)
    balance = segment_balance(done, num_shards, max_share=share, cap=cap)
    meta = _finalize(out_dir, found, cfg, identity, fingerprint, root_value, done, balance)
    shutil.rmtree(state_dir, ignore_errors=True)
    return meta


def _completed_shards(out_dir: str, state_dir: str, num_shards: int) -> dict:
    """Markers of the shards an earlier (interrupted) run finished, whose files are intact."""
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
    if done:
        log.info("resuming %s: %d of %d shards already complete", out_dir, len(done), num_shards)
    return done


def _damaged_shards(out_dir: str, metadata: dict) -> list[str]:
    """The shards of a finished prep run that are missing or whose sizes no longer add up to
    what ``metadata.json`` recorded per split (a cheap check: contents are verified by the
    reader's CRCs). Raises the ``OSError`` of a shard that exists but cannot be opened."""
    problems = []
    splits = metadata.get("splits")
    for name, info in (splits if isinstance(splits, dict) else {}).items():
        files = info.get("files", []) if isinstance(info, dict) else []
        paths = [os.path.join(out_dir, f) for f in files if isinstance(f, str)]
        missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
        if missing:
            problems.extend(f"{f} is missing" for f in missing)
            continue
        for p in paths:  # one this user may not read is not damaged: raised as such
            with open(p, "rb"):
                pass
        size = sum(os.path.getsize(p) for p in paths)
        if size != info.get("num_bytes", size):
            changed = _shards_not_as_written(paths, info.get("sha256"))
            problems.extend(
                [f"{os.path.basename(p)} is not the file it wrote ({n} bytes)" for p, n in changed]
                or [f"the {name} shards hold {size} bytes, metadata.json says {info['num_bytes']}"]
            )
    return problems


def _shards_not_as_written(paths: list[str], digests) -> list[tuple[str, int]]:
    """(path, size) of the shards whose SHA-256 is not the one ``metadata.json`` recorded for
    them; empty when it recorded none to compare with (one per shard). Only called once the
    split's byte total is known to be wrong, so the hashing costs nothing on a healthy rerun."""
    if not isinstance(digests, list) or len(digests) != len(paths):
        return []
    return [
        (p, os.path.getsize(p))
        for p, want in zip(paths, digests, strict=True)
        if input_files.file_sha256(p) != want
    ]


def _claim_out_dir(
    out_dir: str,
    identity: dict,
    fingerprint: str,
    overwrite: bool,
    inputs: list[tuple[str, str]],
) -> str:
    """Returns "new", "resume" or "done"; refuses folders holding another run or other files,
    and a finished run of the same files when any of ``inputs`` ((shown path, path) pairs) holds
    other bytes than it read (the fingerprint sees names and sizes, not contents: audio
    rewritten in place, e.g. re-normalised to the same length, would otherwise keep its old
    features)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PrepError(f"--out {out_dir} exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, records.METADATA_FILE)
    state_path = os.path.join(out_dir, STATE_DIR, "state.json")
    previous = None
    if os.path.exists(meta_path):
        try:
            previous, kind = _read_json(meta_path), "finished"
        except PermissionError:
            raise  # not damaged: the CLI names the file and the reason
        except (OSError, ValueError):  # ValueError: bad JSON, or bytes that are not UTF-8
            previous, kind = {}, "unreadable"
    elif os.path.exists(state_path):
        try:
            previous, kind = _read_json(state_path), "interrupted"
        except PermissionError:
            raise
        except (OSError, ValueError):
            previous, kind = {}, "unreadable"
    if previous is not None and not isinstance(previous, dict):  # e.g. [] or null
        previous, kind = {}, "unreadable"
    if previous is not None:
        if previous.get("fingerprint") == fingerprint and not overwrite:
            changed = input_files.changed(out_dir, meta_path, inputs) if kind == "finished" else []
            if changed:
                listed = ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")
                raise PrepError(
                    f"{out_dir} holds a{'n' if kind[0] in 'aeiou' else ''} {kind} prep run of "
                    f"these files, but {len(changed)} of them changed after it was made "
                    f"({listed}); pass --overwrite (overwrite=True) to prepare them again"
                )
            damaged = _damaged_shards(out_dir, previous) if kind == "finished" else []
            if damaged:
                listed = "; ".join(damaged[:3]) + ("; ..." if len(damaged) > 3 else "")
                raise PrepError(
                    f"{out_dir} holds a finished prep run of these files, but its shards are "
                    f"damaged ({listed}); pass --overwrite (overwrite=True) to prepare them again"
                )
            written_by = records.front_end_version(previous)
            if kind == "interrupted" and written_by != audio.FRONT_END_VERSION:
                raise PrepError(
                    f"{out_dir} holds an interrupted prep run of these files written by "
                    f"another dkd-jax (feature front end version {written_by}, now "
                    f"{audio.FRONT_END_VERSION}: some feature values differ in the last bit), so "
                    "its finished shards and new ones would not be one prep; pass --overwrite "
                    "(overwrite=True) to prepare the corpus again"
                )
            return "done" if kind == "finished" else "resume"
        if kind == "unreadable" and not overwrite:
            damaged = meta_path if os.path.exists(meta_path) else state_path
            raise PrepError(
                f"{damaged} is unreadable (damaged?); pass --overwrite (overwrite=True) to "
                "prepare the corpus again, or choose another --out folder"
            )
        if not overwrite:
            raise PrepError(
                f"{out_dir} holds a{'n' if kind[0] in 'aeiou' else ''} {kind} prep run with a "
                f"different configuration ({_config_diff(previous, identity)}); pass --overwrite "
                "(overwrite=True) to replace it, or choose another --out folder"
            )
        clear_artifacts(out_dir)
        return "new"
    foreign = [n for n in os.listdir(out_dir) if not is_artifact(n)]
    stray = [n for n in os.listdir(out_dir) if is_artifact(n)]
    if stray:
        if not overwrite:
            raise PrepError(
                f"{out_dir} holds prep files ({', '.join(sorted(stray)[:3])}) but no "
                "metadata.json; "
                "pass --overwrite to replace them, or choose another --out folder"
            )
        clear_artifacts(out_dir)
    if foreign and not overwrite:
        raise PrepError(
            f"{out_dir} is not empty ({', '.join(sorted(foreign)[:3])}...) and holds no prep run; "
            "choose an empty or new --out folder (or pass --overwrite to write next to them)"
        )
    return "new"


def _with_path(e: OSError, path: str) -> OSError:
    """``e`` itself when it names a file, else the same error naming ``path``."""
    if e.filename:
        return e
    return type(e)(e.errno, e.strerror or str(e), path)


class _ShardRun:
    """Writes the shards of one prep run that are not complete yet."""

    def __init__(self, out_dir: str, state_dir: str, corpus: str, num_shards: int, utts: list):
        self.out_dir, self.state_dir, self.corpus = out_dir, state_dir, corpus
        self.num_shards = num_shards
        self.shards = [utts[j::num_shards] for j in range(num_shards)]

    def write_pending(self, done: dict, cfg, workers: int | None, cap, progress: bool) -> None:
        """Featurises the utterances of the missing shards and writes them (fills ``done``)."""
        pending = [j for j in range(self.num_shards) if j not in done]
        stream = [u for j in pending for u in self.shards[j]]
        if not stream:
            return
        count = feature_workers.default_workers(len(stream), workers)
        bar = _progress(len(stream), progress, f"prep {self.corpus}")
        try:
            with feature_workers.FeaturePool(cfg, self.corpus, count, cap) as pool:
                results = pool.results(stream)
                for j in pending:
                    done[j] = self._write_shard(j, results, bar)
                    if _on_shard_done is not None:
                        _on_shard_done(j)
        finally:
            bar.close()

    def _write_shard(self, j: int, results: Iterator[tuple], bar) -> dict:
        """Consumes the results of shard ``j``'s utterances; writes both layouts; its marker."""
        names = {s: shard_file(self.corpus, s, j, self.num_shards) for s in records.SPLITS}
        tmp = {s: os.path.join(self.state_dir, names[s] + ".tmp") for s in records.SPLITS}
        digests = {s: hashlib.sha256() for s in records.SPLITS}
        lengths = dict.fromkeys(records.SPLITS, 0)
        rows, skipped = [], []
        files = {}
        try:
            for s in records.SPLITS:
                files[s] = open(tmp[s], "wb")
            for utt in self.shards[j]:
                feature_workers.raise_if_terminated()
                res = next(results)
                if res[0] == "skip":
                    skipped.append(
                        sources.skip_entry(utt.rel_path, res[1], res[2], utt.utterance_id)
                    )
                else:
                    _, row, train, n_train, evals, n_eval = res
                    for split, blob, n in (("train", train, n_train), ("eval", evals, n_eval)):
                        try:
                            files[split].write(blob)
                        except OSError as e:
                            raise _with_path(e, tmp[split]) from None
                        digests[split].update(blob)
                        lengths[split] += n
                    rows.append(row)
                bar.update(1)
        finally:
            for s, f in files.items():
                try:
                    f.close()
                except OSError as e:  # a full disk can fail at the final flush
                    raise _with_path(e, tmp[s]) from None
        info = {"shard": j, "files": {}, "rows": rows, "skipped": skipped}
        for s in records.SPLITS:
            final = os.path.join(self.out_dir, names[s])
            os.replace(tmp[s], final)
            info["files"][s] = {
                "name": names[s],
                "num_records": lengths[s],
                "num_bytes": os.path.getsize(final),
                "sha256": digests[s].hexdigest(),
            }
        _write_json(os.path.join(self.state_dir, f"shard-{j:05d}.json"), info)
        return info


def segment_balance(done: dict, num_shards: int, *, max_share: float, cap: int | None) -> dict:
    """How evenly the utterances supply the "train" segments; warns about dominant ones.

    Args:
      done: shard markers (``rows`` with ``num_train_segments``).
      num_shards: shards per split.
      max_share: an utterance with more than this share of the segments, and more than twice
        an even share (``2 / utterances``), is "dominant". The second condition keeps a corpus
        of under ``2 / max_share`` utterances from flagging every one of them: there each
        recording supplies over ``max_share`` by arithmetic, not by being long.
      cap: the ``max_segments_per_utterance`` the run used (None: no cap).

    Returns:
      {"layout": "train", "max_utterance_share", "max_segments_per_utterance",
      "total_segments", "capped_utterances", "segments_removed_by_cap", "dominant":
      [{"utterance_id", "segments", "share"}] largest first} (stored in metadata.json).
    """
    rows = [r for j in range(num_shards) for r in done[j]["rows"]]
    total = sum(r["num_train_segments"] for r in rows)
    threshold = max(max_share, 2.0 / len(rows)) * total if rows else 0.0
    dominant = sorted(
        (
            {
                "utterance_id": r["utterance_id"],
                "segments": r["num_train_segments"],
                "share": round(r["num_train_segments"] / total, 4),
            }
            for r in rows
            if total and r["num_train_segments"] > threshold
        ),
        key=lambda d: (-d["segments"], d["utterance_id"]),
    )
    capped = [r for r in rows if "train_segments_before_cap" in r]
    for d in dominant[:5]:
        log.warning(
            "warning: utterance %s supplies %d of the %d train segments (%.0f %%, more than "
            "%.0f %%); one recording then dominates training: cap it with "
            "--max-segments-per-utterance N",
            d["utterance_id"],
            d["segments"],
            total,
            100 * d["share"],
            100 * max_share,
        )
    if len(dominant) > 5:
        log.warning("warning: %d more such utterances (listed in metadata.json)", len(dominant) - 5)
    return {
        "layout": "train",
        "max_utterance_share": max_share,
        "max_segments_per_utterance": cap,
        "total_segments": total,
        "capped_utterances": len(capped),
        "segments_removed_by_cap": sum(
            r["train_segments_before_cap"] - r["num_train_segments"] for r in capped
        ),
        "dominant": dominant,
    }


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


def _split_info(done: dict, cfg: audio.FeatureConfig, num_shards: int) -> dict:
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
    return splits


def _counts(found: Scan, rows: list, splits: dict, skipped: list, late_skips: list) -> dict:
    label_names = found.label_names
    seg_by_class = {}
    for s in records.SPLITS:
        key = "num_train_segments" if s == "train" else "num_eval_segments"
        c = collections.Counter()
        for r in rows:
            c[r["label_name"]] += r[key]
        seg_by_class[s] = {n: c.get(n, 0) for n in label_names}
    by_class = collections.Counter(r["label_name"] for r in rows)
    return {
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


def _content_hash(splits: dict, cfg: audio.FeatureConfig, label_names: list, rows: list) -> str:
    """SHA-256 over the shard digests, the feature config, the label names and the rows."""
    content = hashlib.sha256()
    for s in records.SPLITS:
        for name, digest in zip(splits[s]["files"], splits[s]["sha256"], strict=True):
            content.update(f"{name} {digest}\n".encode())
    content.update(_canonical({"feature_config": cfg.to_dict(), "label_names": label_names}))
    content.update(_canonical(rows))
    return "sha256:" + content.hexdigest()


def _finalize(
    out_dir: str,
    found: Scan,
    cfg: audio.FeatureConfig,
    identity: dict,
    fingerprint: str,
    root_value: str,
    done: dict,
    balance: dict,
) -> dict:
    num_shards = identity["num_shards"]
    rows = sorted(
        (r for j in range(num_shards) for r in done[j]["rows"]), key=lambda r: r["utterance_id"]
    )
    late_skips = [s for j in range(num_shards) for s in done[j]["skipped"]]
    if not rows:
        msg = _nothing_left_message(root_value, found, len(found.utterances), late_skips)
        clear_artifacts(out_dir)
        raise PrepError(msg)
    skipped = sorted(found.skipped + late_skips, key=lambda s: (s["path"], s["utterance_id"]))
    splits = _split_info(done, cfg, num_shards)
    kind = identity["source"]["kind"]
    meta = {
        "format_version": records.FORMAT_VERSION,
        "corpus": found.corpus,
        "dataset_name": found.corpus,
        "source": {"kind": kind, ("manifest" if kind == "csv" else "root"): root_value},
        "feature_config": cfg.to_dict(),
        "segment_shape": list(cfg.segment_shape),
        "frames_per_window": cfg.frames_per_window,
        "label_names": found.label_names,
        "num_classes": len(found.label_names),
        "num_shards": num_shards,
        "splits": splits,
        "counts": _counts(found, rows, splits, skipped, late_skips),
        "segment_balance": balance,
        "content_hash": _content_hash(splits, cfg, found.label_names, rows),
        "front_end": audio.FRONT_END_VERSION,
        "fingerprint": fingerprint,
        "inputs_hash": identity["inputs_hash"],
        "skipped": skipped,
        "utterances": rows,
    }
    meta["source"].update(found.options)
    _write_tfds_metadata(out_dir, found, cfg, splits)
    input_files.write_digests(out_dir, found.utterances)
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


__all__ = [
    "DEFAULT_MAX_UTTERANCE_SHARE",
    "SCANNERS",
    "PrepError",
    "prepare",
    "resolve_feature_config",
    "scan",
    "segment_balance",
    "shard_file",
]
