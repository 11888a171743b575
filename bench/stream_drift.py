"""How far a stream's per-utterance normalisation ends from the whole file's (no model needed).

``eval.py predict --model DIR --stream`` normalises each window with the statistics of the stream
so far. With log-mel features the last window is then normalised exactly as the whole file
would be. The MFCC front end's floor (80 dB below the loudest frame) can only use the loudest
frame *so far*, so windows computed before a louder passage arrived enter those statistics with
their lower floor. This script measures what that does to the last window: for each feature
preset and each signal it streams the audio through ``streaming.StreamingFrontEnd`` (0.4-s blocks),
accumulates the windows' moments as ``StreamPredictor`` does, and compares the last window
normalised with them against the whole file's last window normalised with the whole file's
statistics (``predict.file_segments`` + ``deploy.normalize_segments``, the ``--model`` path).

Signals (16 kHz, seeded): ``steady`` (30 s of noise at one level), ``late_burst`` (the same with
2 s at +30 dB at its end), ``early_burst`` (the burst at its start), ``silences_late_burst`` /
``silences_early_burst`` (noise with 0.5 s of digital silence every 2 s, and the burst at the
end / the start), and with ``--emodb DIR`` ``emodb_loudest_last``: the folder's WAVs joined with
0.5 s of digital silence, ordered by level so that the loudest comes last.

  python bench/stream_drift.py [--emodb ../shared/data/emodb/originals_16k] [--out FILE]

Prints the JSON (per preset and signal: the largest absolute difference of the last window's
normalised features, their largest magnitude, and the number of windows).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchjson

from dkd_jax import audio, deploy, predict, streaming

RATE = 16000
PRESETS = ("logmel40", "mfcc26")


def signals(emodb: str | None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    steady = (0.003 * rng.standard_normal(30 * RATE)).astype(np.float32)
    burst = (0.1 * rng.standard_normal(2 * RATE)).astype(np.float32)
    # 1.5 s of noise then 0.5 s of digital silence, 15 times: the silent frames sit at the
    # MFCC floor, which moves when a louder frame arrives
    gap = np.zeros(RATE // 2, np.float32)
    gaps = np.concatenate([x for _ in range(15) for x in (steady[: 3 * RATE // 2], gap)])
    out = {
        "steady": steady,
        "late_burst": np.concatenate([steady, burst]),
        "early_burst": np.concatenate([burst, steady]),
        "silences_late_burst": np.concatenate([gaps, burst]),
        "silences_early_burst": np.concatenate([burst, gaps]),
    }
    if emodb:
        waves = [audio.load_audio(p, sample_rate=RATE) for p in sorted(Path(emodb).glob("*.wav"))]
        if not waves:
            raise SystemExit(f"stream_drift: no .wav files in {emodb}")
        waves.sort(key=lambda w: float(np.sqrt(np.mean(w**2))))
        gap = np.zeros(RATE // 2, np.float32)
        out["emodb_loudest_last"] = np.concatenate([x for w in waves for x in (w, gap)][:-1])
    return out


def drift(wave: np.ndarray, preset: str, folder: str) -> dict[str, float]:
    fc = audio.FEATURE_PRESETS[preset]
    path = os.path.join(folder, f"{preset}.wav")
    sf.write(path, wave, RATE, subtype="FLOAT")
    seg = predict.file_segments(path, fc)
    rule = {"mode": "utterance"}
    whole = deploy.normalize_segments(seg["segments"], seg["valid_frames"], rule)[-1]
    front = streaming.StreamingFrontEnd(fc)
    windows = []
    for block in streaming.file_blocks(path, sample_rate=fc.sample_rate):
        windows += front.push(block)
    windows += front.finish()
    moments = [0.0, 0.0, 0.0]
    for w in windows:
        m = deploy.window_moments(w.features[None], np.array([w.valid_frames]))
        moments = [a + b for a, b in zip(moments, m, strict=True)]
    last = windows[-1]
    streamed = deploy.normalize_segments(
        last.features[None], np.array([last.valid_frames]), rule, moments=tuple(moments)
    )[0]
    return {
        "windows": len(windows),
        "last_window_max_abs_difference": float(np.abs(streamed - whole).max()),
        "last_window_max_abs_value": float(np.abs(whole).max()),
        "raw_features_of_last_window_equal": bool(
            np.array_equal(last.features, seg["segments"][-1])
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--emodb", help="a folder of WAVs to join (e.g. ../shared/data/emodb/originals_16k)"
    )
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    benchjson.check_out(p, args.out)
    report = {"presets": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name, wave in signals(args.emodb).items():
            for preset in PRESETS:
                report["presets"].setdefault(preset, {})[name] = drift(wave, preset, folder)
    return benchjson.emit(report, args.out, command=benchjson.command_line("stream_drift.py", argv))


if __name__ == "__main__":
    sys.exit(main())
