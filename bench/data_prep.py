"""Benchmark of the offline data step: corpus → TFRecord shards, and shards → numpy.

Prints one JSON object (also written to ``--out``): seconds of audio per wall-clock second of
the prep (end to end: scan, audio decoding and resampling, features, both segment layouts,
shard writing, metadata), CPU seconds spent (this process and its workers), segments written
per second, peak resident memory of the main process and of the feature workers, and the read
speed of ``dkd_jax.records.load_split`` (segments/s, CRCs verified).

Inputs (generated once and cached in ``--corpus-dir``, by default the system's temporary folder,
as ``dkd_bench_corpus_*``; generation is not timed):
  * ``--source synth``: the synthetic IEMOCAP-layout corpus of ``data_prep.synth``
    (``--size demo|iemocap``), prepared with the IEMOCAP reader;
  * ``--source csv``: the same corpus's four-class utterances resampled to ``--sample-rate``
    (default 44.1 kHz, polyphase, PCM16) in a folder per speaker with a CSV manifest, prepared
    with ``data_prep csv`` (the path of a user's own corpus);
  * ``--source tones``: plain 16 kHz tone+noise WAVs in the IEMOCAP layout (``--hours``).

``--mode api`` times ``data_prep.prepare`` in this process; ``--mode cli`` times
``python -m data_prep`` in a fresh interpreter (start-up and imports included, as a user sees
it; memory is then not reported).

  python bench/data_prep.py                                   # synth demo corpus (~16 min kept)
  python bench/data_prep.py --size iemocap                    # IEMOCAP-sized (~12 h)
  python bench/data_prep.py --source csv --mode cli --out bench/results/prep_csv44k.json
  python bench/data_prep.py --source tones --hours 2 --features mfcc26
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import benchjson  # noqa: E402  (bench/ is the script directory)
import numpy as np  # noqa: E402

import data_prep  # noqa: E402
from data_prep import pipeline  # noqa: E402
from dkd_jax import audio, records  # noqa: E402


def _tone_corpus(root: str, hours: float, seed: int = 0) -> None:
    """IEMOCAP-layout corpus of tone+noise WAVs, 2-8 s each, 4 labels, 5 sessions."""
    import soundfile as sf

    if os.path.exists(os.path.join(root, ".complete")):
        return
    rng = np.random.default_rng(seed)
    total, i = 0.0, 0
    labels = ("neu", "exc", "sad", "ang", "fru", "xxx")
    blocks: dict[tuple[int, str], list[str]] = {}
    while total < hours * 3600:
        session = 1 + i % 5
        dialog = f"Ses{session:02d}F_impro{1 + (i // 5) % 8:02d}"
        utt = f"{dialog}_{'FM'[i % 2]}{i // 10:03d}"
        seconds = float(rng.uniform(2.0, 8.0))
        n = round(seconds * 16000)
        t = np.arange(n) / 16000
        f0 = rng.uniform(100, 300)
        wave = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.03 * rng.standard_normal(n)
        wdir = os.path.join(root, f"Session{session}", "sentences", "wav", dialog)
        os.makedirs(wdir, exist_ok=True)
        sf.write(os.path.join(wdir, utt + ".wav"), wave.astype(np.float32), 16000)
        label = labels[i % len(labels)]
        blocks.setdefault((session, dialog), []).append(
            f"[0.0000 - {seconds:.4f}]\t{utt}\t{label}\t[2.5000, 2.5000, 2.5000]\n\n"
        )
        total += seconds
        i += 1
    for (session, dialog), lines in blocks.items():
        emo = os.path.join(root, f"Session{session}", "dialog", "EmoEvaluation")
        os.makedirs(emo, exist_ok=True)
        with open(os.path.join(emo, dialog + ".txt"), "w") as f:
            f.write("% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n" + "".join(lines))
    open(os.path.join(root, ".complete"), "w").close()


def _csv_corpus(synth_root: str, root: str, sample_rate: int) -> str:
    """The synthetic corpus's kept utterances at ``sample_rate``, one folder per speaker + CSV."""
    import math

    import scipy.signal
    import soundfile as sf

    from data_prep import sources

    path = os.path.join(root, "manifest.csv")
    if os.path.exists(os.path.join(root, ".complete")):
        return path
    scan = sources.scan_iemocap(synth_root)
    g = math.gcd(sample_rate, 16000)
    rows = []
    for u in scan.utterances:
        wave, sr = sf.read(u.path, dtype="float64")
        assert sr == 16000, (u.path, sr)
        up = scipy.signal.resample_poly(wave, sample_rate // g, 16000 // g)
        rel = os.path.join(u.speaker, os.path.basename(u.path))
        os.makedirs(os.path.join(root, u.speaker), exist_ok=True)
        sf.write(os.path.join(root, rel), np.clip(up, -1, 1), sample_rate, subtype="PCM_16")
        rows.append((rel, u.label_name, u.speaker, u.session, u.gender))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("path", "label", "speaker", "session", "gender"))
        w.writerows(rows)
    open(os.path.join(root, ".complete"), "w").close()
    return path


#: The folder-name prefix of the corpora this benchmark generates (``_corpus``).
CORPUS_PREFIX = "dkd_bench_corpus_"


def _made_by_this_benchmark(folder: str) -> bool:
    """``folder`` holds a prep run of one of this benchmark's generated corpora (its
    metadata.json names a ``CORPUS_PREFIX`` folder): only such a folder is emptied for a new
    timing, never a user's own prep or other files."""
    try:
        with open(os.path.join(folder, records.METADATA_FILE), encoding="utf-8") as f:
            source = json.load(f).get("source", {})
    except (OSError, ValueError, AttributeError):
        return False
    where = source.get("manifest") or source.get("root") if isinstance(source, dict) else None
    return isinstance(where, str) and CORPUS_PREFIX in where


def _corpus(args) -> tuple[str, dict, str]:
    """(tag, prepare() source options, CLI arguments) of the benchmark corpus (generated)."""
    cache = args.corpus_dir or tempfile.gettempdir()
    if args.source == "tones":
        root = os.path.join(cache, f"{CORPUS_PREFIX}tones_{args.hours:g}h")
        _tone_corpus(root, args.hours)
        return f"tones {args.hours:g}h", {"root": root}, f"iemocap --root {root}"
    from data_prep import synth

    synth_root = os.path.join(cache, f"{CORPUS_PREFIX}synth_{args.size}")
    synth.generate_corpus(synth_root, size=args.size, seed=0, progress=False)
    if args.source == "synth":
        return f"synth {args.size}", {"root": synth_root}, f"iemocap --root {synth_root}"
    root = os.path.join(cache, f"{CORPUS_PREFIX}csv_{args.size}_{args.sample_rate}")
    manifest = _csv_corpus(synth_root, root, args.sample_rate)
    tag = f"csv {args.size} {args.sample_rate / 1000:g} kHz"
    return tag, {"manifest": manifest}, f"csv --manifest {manifest}"


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _run_api(args, options: dict, out: str) -> tuple[dict, float, dict]:
    kind = "csv" if "manifest" in options else "iemocap"
    t0, c0 = time.perf_counter(), _cpu_seconds()
    meta = data_prep.prepare(
        kind,
        out_dir=out,
        feature_config=args.features,
        workers=args.workers,
        progress=False,
        **options,
    )
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    memory = {
        "peak_rss_main_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_worker_mib": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
        ),
    }
    return meta, wall, {"cpu_s": round(cpu, 2), **memory}


def _run_cli(args, cli_args: str, out: str) -> tuple[dict, float, dict]:
    argv = [sys.executable, "-m", "data_prep", *cli_args.split(), "--out", out, "--no-progress"]
    argv += ["--features", args.features]
    if args.workers:
        argv += ["--workers", str(args.workers)]
    c0 = _cpu_seconds()
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=REPO, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    return records.load_metadata(out), wall, {"cpu_s": round(_cpu_seconds() - c0, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", choices=("synth", "csv", "tones"), default="synth")
    p.add_argument("--size", default="demo", help="synth size preset (demo, iemocap, tiny)")
    p.add_argument("--sample-rate", type=int, default=44100, help="rate of the csv corpus")
    p.add_argument("--hours", type=float, default=1.0, help="audio hours for --source tones")
    p.add_argument("--features", default="logmel40", choices=sorted(audio.FEATURE_PRESETS))
    p.add_argument("--workers", type=int, default=None, help="default: data_prep's own default")
    p.add_argument("--mode", choices=("api", "cli"), default="api")
    p.add_argument("--corpus-dir", default=None, help="cache folder of the generated corpora")
    p.add_argument(
        "--prep-dir",
        default=None,
        help="prep dir, kept (default: a temp dir, deleted); one holding this benchmark's earlier "
        "prep is emptied first, anything else refused",
    )
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    prep_dir = args.prep_dir
    if prep_dir and os.path.exists(prep_dir) and not os.path.isdir(prep_dir):
        p.error(f"--prep-dir {prep_dir}: exists and is not a folder")
    if prep_dir and args.out:
        folder = os.path.realpath(prep_dir)
        if os.path.commonpath([folder, os.path.realpath(args.out)]) == folder:
            p.error(
                f"--out {args.out} lies inside --prep-dir {prep_dir}, a folder only the prep "
                "may fill (a second run would refuse it); write the JSON elsewhere"
            )
    if prep_dir and os.path.isdir(prep_dir) and os.listdir(prep_dir):
        other = sorted(n for n in os.listdir(prep_dir) if not pipeline.is_artifact(n))
        if not _made_by_this_benchmark(prep_dir) or other:  # never a user's prep or files
            held = f" (it holds {', '.join(other[:3])})" if other else ""
            p.error(
                f"--prep-dir {prep_dir}: not empty and holds no prep run of this benchmark's "
                f"corpora alone{held}; choose a new folder"
            )
    benchjson.check_out(p, args.out)
    t0 = time.perf_counter()
    tag, options, cli_args = _corpus(args)
    corpus_seconds = time.perf_counter() - t0
    out = args.prep_dir or tempfile.mkdtemp(prefix="dkd_bench_prep_")
    if os.path.exists(out) and os.listdir(out):
        pipeline.clear_artifacts(out)  # an earlier benchmark's prep: timed again from scratch
    if args.mode == "api":
        meta, wall, extra = _run_api(args, options, out)
    else:
        meta, wall, extra = _run_cli(args, cli_args, out)

    t0 = time.perf_counter()
    arrays = records.load_split(out, "eval")
    read_s = time.perf_counter() - t0
    audio_s = meta["counts"]["duration_s"]
    segments = meta["counts"]["segments"]["train"] + meta["counts"]["segments"]["eval"]
    result = {
        "bench": "data_prep",
        "command": "bench/data_prep.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "mode": args.mode,
        "corpus": tag,
        "features": args.features,
        "segment_shape": meta["segment_shape"],
        "workers": args.workers or "default",
        "cpu_count": os.cpu_count(),
        "utterances": meta["counts"]["utterances"],
        "audio_minutes": round(audio_s / 60, 2),
        "prep_wall_s": round(wall, 2),
        "realtime_factor": round(audio_s / wall, 1),
        **extra,
        "segments_written": segments,
        "segments_per_s": round(segments / wall, 1),
        "output_mib": round(sum(meta["splits"][s]["num_bytes"] for s in records.SPLITS) / 2**20, 1),
        "content_hash": meta["content_hash"],
        "read_eval_segments": len(arrays),
        "read_segments_per_s": round(len(arrays) / read_s, 1),
        "corpus_generation_s": round(corpus_seconds, 1),
    }
    del arrays
    if not args.prep_dir:
        shutil.rmtree(out, ignore_errors=True)
    return benchjson.emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
