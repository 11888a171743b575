"""Benchmark of the offline data step: corpus → TFRecord shards, and shards → numpy.

Prints one JSON object: seconds of audio per wall-clock second of ``data_prep.prepare`` (end to
end: scan, WAV decoding, features, both segment layouts, shard writing, metadata), segments
written per second, peak resident memory of the main process and of the feature workers, and
the read speed of ``dkd_jax.records.load_split`` (segments/s, CRCs verified).

Input: the synthetic IEMOCAP-layout corpus of ``data_prep.synth`` (``--source synth --size
demo|iemocap``, generated once and cached in ``--corpus-dir``), or, with ``--source tones``,
plain 16 kHz tone+noise WAVs in the IEMOCAP layout (``--hours``). Corpus generation is not
timed.

  python bench/data_prep.py                            # synth demo corpus (~25 min of audio)
  python bench/data_prep.py --size iemocap             # IEMOCAP-sized (~12 h)
  python bench/data_prep.py --source tones --hours 2 --features mfcc26
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

import data_prep
from dkd_jax import audio, records


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", choices=("synth", "tones"), default="synth")
    p.add_argument("--size", default="demo", help="synth size preset (demo, iemocap, tiny)")
    p.add_argument("--hours", type=float, default=1.0, help="audio hours for --source tones")
    p.add_argument("--features", default="logmel40", choices=sorted(audio.FEATURE_PRESETS))
    p.add_argument("--workers", type=int, default=None, help="default: CPU count")
    p.add_argument("--corpus-dir", default=None, help="cache folder of the generated corpus")
    p.add_argument("--out", default=None, help="prep dir (default: a temp dir, deleted)")
    p.add_argument("--keep", action="store_true", help="keep the prep dir")
    args = p.parse_args(argv)

    tag = args.size if args.source == "synth" else f"{args.hours:g}h"
    corpus = args.corpus_dir or os.path.join(
        tempfile.gettempdir(), f"dkd_bench_corpus_{args.source}_{tag}"
    )
    t0 = time.perf_counter()
    if args.source == "synth":
        from data_prep import synth

        synth.generate_corpus(corpus, size=args.size, seed=0, progress=False)
    else:
        _tone_corpus(corpus, args.hours)
    corpus_seconds = time.perf_counter() - t0

    out = args.out or tempfile.mkdtemp(prefix="dkd_bench_prep_")
    if os.path.exists(out) and os.listdir(out):
        shutil.rmtree(out)
    workers = args.workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    meta = data_prep.prepare(
        "iemocap",
        root=corpus,
        out_dir=out,
        feature_config=args.features,
        workers=workers,
        progress=False,
    )
    wall = time.perf_counter() - t0
    rss_main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    t0 = time.perf_counter()
    arrays = records.load_split(out, "eval")
    read_s = time.perf_counter() - t0
    audio_s = meta["counts"]["duration_s"]
    segments = meta["counts"]["segments"]["train"] + meta["counts"]["segments"]["eval"]
    out_bytes = sum(meta["splits"][s]["num_bytes"] for s in records.SPLITS)
    result = {
        "bench": "data_prep",
        "source": args.source,
        "corpus": tag,
        "features": args.features,
        "segment_shape": meta["segment_shape"],
        "workers": workers,
        "cpu_count": os.cpu_count(),
        "utterances": meta["counts"]["utterances"],
        "audio_hours": round(audio_s / 3600, 3),
        "prep_wall_s": round(wall, 2),
        "realtime_factor": round(audio_s / wall, 1),
        "segments_written": segments,
        "segments_per_s": round(segments / wall, 1),
        "output_mib": round(out_bytes / 2**20, 1),
        "peak_rss_main_mib": round(rss_main, 1),
        "peak_rss_worker_mib": round(rss_workers, 1),
        "read_eval_segments": len(arrays),
        "read_segments_per_s": round(len(arrays) / read_s, 1),
        "corpus_generation_s": round(corpus_seconds, 1),
    }
    del arrays
    if not args.keep and not args.out:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
