"""Latency of a deployed model on CPU: per 2-s window, batch 1, one thread and all cores.

Prints one JSON object (and writes it to ``--out`` if given). From a trained run (e.g. the
EmoDB fold-0 student) it exports ``model.onnx`` (``dkd_jax.export``) and a dynamic-int8 copy
(``onnxruntime.quantization.quantize_dynamic``, int8 weights, activations quantised per call),
then measures, each in a fresh process pinned to one core (``1``) or free on all of them
(``all``):

* ``model``: p50 / p99 milliseconds per window and windows/s (1 / mean latency) at batch 1,
  over ``--calls`` calls on the run's real, normalised test windows, for ``flax_jit`` (the Flax
  model under ``jax.jit``), ``onnxruntime`` and ``onnxruntime_int8``;
* ``front_end``: milliseconds to compute one window's features: the whole-file path on a 2-s
  waveform (``audio.compute_features``) and the streaming path per 0.4-s hop
  (``streaming.StreamingFrontEnd.push``, which yields one window);
* ``stream``: the end-to-end real-time factor of ``eval.py predict --model --stream`` (file
  decoding, streaming features, normalisation, ONNX, smoothing; nothing printed) on the run's
  test utterances concatenated into one file: seconds of audio per second of wall time, for the
  first pass of a fresh worker process (the ONNX session is created before the clock starts;
  onnxruntime's first-call set-up and the front end's first use are included) and a second pass;
* ``accuracy``: WA / UA on the run's held-out test utterances (mean of window logits per
  utterance) of the Flax model, the ONNX model and the int8 model.

  python bench/latency.py --workdir RUN [--out bench/results/latency_cpu.json] [--calls 500]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINES = ("flax_jit", "onnxruntime", "onnxruntime_int8")
THREADS = ("1", "all")


# --------------------------------------------------------------------------------------------
# Workers (one process per measurement, so thread settings take effect before any import)
# --------------------------------------------------------------------------------------------


def _pin(threads: str) -> None:
    if threads == "1":
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
    os.environ["JAX_PLATFORMS"] = "cpu"


def _percentiles(ms: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(ms)
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 4),
        "p99_ms": round(float(np.percentile(a, 99)), 4),
        "mean_ms": round(float(a.mean()), 4),
        "windows_per_s": round(1000.0 / float(a.mean()), 1),
        "calls": len(ms),
    }


def _time_calls(fn, windows, calls: int, warmup: int = 30) -> dict[str, float]:
    for i in range(warmup):
        fn(windows[i % len(windows)][None])
    ms = []
    for i in range(calls):
        x = windows[i % len(windows)][None]
        t0 = time.perf_counter()
        fn(x)
        ms.append(1000.0 * (time.perf_counter() - t0))
    return _percentiles(ms)


def _worker_model(args) -> dict[str, Any]:
    import numpy as np

    windows = np.load(args.windows)[..., None]
    if args.engine == "flax_jit":
        import jax

        from dkd_jax import export

        run = export.restore(args.workdir)
        f = jax.jit(export.inference_function(run.model, run.variables))
        return _time_calls(lambda x: np.asarray(f(x)), windows, args.calls)
    from dkd_jax import deploy

    sub = "int8" if args.engine == "onnxruntime_int8" else "fp32"
    clf = deploy.OnnxClassifier(Path(args.models) / sub, threads=1 if args.threads == "1" else None)
    run = clf.session.run
    return _time_calls(lambda x: run(None, {"features": x}), windows, args.calls)


def _worker_front_end(args) -> dict[str, Any]:
    import numpy as np

    from dkd_jax import audio, deploy, streaming

    fc = deploy.feature_config(deploy.load_card(Path(args.models) / "fp32"))
    wave = audio.load_audio(args.wav, sample_rate=fc.sample_rate)
    n = fc.window_samples
    whole = []
    for i in range(args.calls // 5 + 10):
        start = (i * 3217) % (wave.shape[0] - n)
        t0 = time.perf_counter()
        audio.compute_features(wave[start : start + n], fc)
        whole.append(1000.0 * (time.perf_counter() - t0))
    hop = round(fc.eval_hop_seconds * fc.sample_rate)
    fe = streaming.StreamingFrontEnd(fc)
    per_hop, emitted = [], 0
    for start in range(0, wave.shape[0] - hop, hop):
        t0 = time.perf_counter()
        emitted += len(fe.push(wave[start : start + hop]))
        per_hop.append(1000.0 * (time.perf_counter() - t0))
    steady = per_hop[round(fc.window_seconds / fc.eval_hop_seconds) :]  # one window per hop
    return {
        "whole_window_ms": _percentiles(whole[10:]),
        "streaming_per_hop_ms": _percentiles(steady),
        "windows": emitted,
        "feature_kind": fc.kind,
        "segment_shape": list(fc.segment_shape),
        "np": np.__version__,
    }


def _worker_stream(args) -> dict[str, Any]:
    import soundfile as sf

    from dkd_jax import deploy, streaming

    threads = 1 if args.threads == "1" else None
    clf = deploy.OnnxClassifier(Path(args.models) / "fp32", threads=threads)
    seconds = sf.info(args.wav).duration
    out: dict[str, Any] = {"audio_seconds": round(seconds, 2)}
    # "first": the first pass of this fresh process (the session above is built before the
    # clock starts; onnxruntime's first-call set-up is included); "steady": the same stream
    # again in the same process.
    for name in ("first", "steady"):
        t0 = time.perf_counter()
        blocks = streaming.file_blocks(args.wav, sample_rate=clf.features.sample_rate)
        rows = sum(1 for _ in streaming.stream_rows(clf, blocks, smoothing_seconds=1.0))
        wall = time.perf_counter() - t0
        out[name] = {"wall_seconds": round(wall, 3), "real_time_factor": round(seconds / wall, 1)}
    out["rows"] = rows
    return out


def _worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=("model", "front_end", "stream"))
    p.add_argument("--engine", default="onnxruntime")
    p.add_argument("--threads", choices=THREADS, default="all")
    p.add_argument("--workdir")
    p.add_argument("--models")
    p.add_argument("--windows")
    p.add_argument("--wav")
    p.add_argument("--calls", type=int, default=500)
    args = p.parse_args(argv)
    _pin(args.threads)
    fn = {"model": _worker_model, "front_end": _worker_front_end, "stream": _worker_stream}
    print(json.dumps(fn[args.kind](args)))
    return 0


def _spawn(*argv: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "_worker", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Set-up: export, quantise, test windows, the long file, accuracy
# --------------------------------------------------------------------------------------------


def _prepare(workdir: Path, tmp: Path) -> dict[str, Any]:
    """Exports fp32 + int8 models and writes the test windows and the concatenated test audio."""
    import numpy as np
    import soundfile as sf
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from dkd_jax import audio, export, input_pipeline, records

    card = export.export_run(workdir, tmp / "fp32", formats=["onnx"])
    (tmp / "int8").mkdir()
    quantize_dynamic(
        tmp / "fp32" / "model.onnx", tmp / "int8" / "model.onnx", weight_type=QuantType.QInt8
    )
    # The int8 copy's card: the fp32 one with the int8 file's digest (deploy checks it: the
    # bench failed with "its sha256 is not the one model.json records" once exports had one).
    int8_card = json.loads((tmp / "fp32" / "model.json").read_text())
    int8_card["files"]["onnx"]["sha256"] = hashlib.sha256(
        (tmp / "int8" / "model.onnx").read_bytes()
    ).hexdigest()
    (tmp / "int8" / "model.json").write_text(json.dumps(int8_card, indent=2) + "\n")
    run = export.restore(workdir)
    split = run.split
    arrays = input_pipeline.load_segments(run.config.data.prep_dir, "eval", split.test_ids)
    arrays = input_pipeline.normalize_arrays(arrays, run.normalization)
    np.save(tmp / "windows.npy", arrays.features)
    meta = records.load_metadata(run.config.data.prep_dir)
    paths = {u["utterance_id"]: records.audio_path(meta, u) for u in meta["utterances"]}
    rate = card["features"]["sample_rate"]
    wave = np.concatenate([audio.load_audio(paths[u], sample_rate=rate) for u in split.test_ids])
    sf.write(tmp / "test_utterances.wav", wave, rate, subtype="PCM_16")
    return {"card": card, "run": run, "arrays": arrays, "split": split}


def _accuracy(prep: dict[str, Any], tmp: Path) -> dict[str, Any]:
    import jax
    import numpy as np

    from dkd_jax import deploy, eval_lib, export

    run, arrays = prep["run"], prep["arrays"]
    names = prep["card"]["label_names"]
    f = jax.jit(export.inference_function(run.model, run.variables))
    logits = {
        "flax_jit": np.concatenate(
            [
                np.asarray(f(arrays.features[i : i + 64, ..., None]))
                for i in range(0, len(arrays), 64)
            ]
        ),
        "onnxruntime": deploy.OnnxClassifier(tmp / "fp32").logits(arrays.features),
        "onnxruntime_int8": deploy.OnnxClassifier(tmp / "int8").logits(arrays.features),
    }
    out = {}
    for engine, lg in logits.items():
        scores = eval_lib.score_segments(lg, arrays.labels, arrays.utterance_ids)
        rep = eval_lib.classification_report(scores.labels, scores.predictions, label_names=names)
        out[engine] = {
            "wa": round(rep["wa"], 4),
            "ua": round(rep["ua"], 4),
            "max_abs_logit_diff_vs_flax": round(float(np.abs(lg - logits["flax_jit"]).max()), 6),
        }
    drop = 100 * (out["onnxruntime"]["ua"] - out["onnxruntime_int8"]["ua"])
    out["int8_ua_drop_points"] = round(drop, 2)
    out["int8_within_1_ua_point"] = bool(drop <= 1.0)
    out["num_utterances"] = len(set(arrays.utterance_ids.tolist()))
    out["num_windows"] = len(arrays)
    return out


def _machine() -> dict[str, Any]:
    import benchjson  # bench/ is the script's directory

    return {
        "cpu": benchjson.cpu_model(),
        "cores_available": len(os.sched_getaffinity(0)),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_worker":
        return _worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a trained run (e.g. an EmoDB fold-0 student)")
    p.add_argument("--calls", type=int, default=500, help="timed calls per measurement")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    import benchjson  # bench/ is the script's directory

    benchjson.check_out(p, args.out)
    workdir = Path(args.workdir).absolute()
    import importlib.metadata

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        prep = _prepare(workdir, tmp)
        report: dict[str, Any] = {
            "benchmark": "latency",
            "command": "python bench/latency.py " + " ".join(argv),
            "run": {
                "workdir": str(workdir),
                "split": prep["split"].name,
                "step": prep["card"]["source"]["step"],
                "num_parameters": prep["card"]["model"]["num_parameters"],
                "segment_shape": prep["card"]["model"]["input"]["shape"][1:3],
            },
            "machine_before": _machine(),
            "versions": {
                n: importlib.metadata.version(n) for n in ("jax", "onnxruntime", "numpy", "librosa")
            },
            "model": {},
        }
        models_dir, windows, wav = (
            str(tmp),
            str(tmp / "windows.npy"),
            str(tmp / "test_utterances.wav"),
        )
        for engine in ENGINES:
            for threads in THREADS:
                report["model"][f"{engine}/{threads}"] = _spawn(
                    "model",
                    "--engine",
                    engine,
                    "--threads",
                    threads,
                    "--workdir",
                    str(workdir),
                    "--models",
                    models_dir,
                    "--windows",
                    windows,
                    "--calls",
                    str(args.calls),
                )
        report["front_end"] = {
            t: _spawn(
                "front_end",
                "--threads",
                t,
                "--models",
                models_dir,
                "--wav",
                wav,
                "--calls",
                str(args.calls),
            )
            for t in THREADS
        }
        report["stream"] = {
            t: _spawn("stream", "--threads", t, "--models", models_dir, "--wav", wav)
            for t in THREADS
        }
        report["accuracy"] = _accuracy(prep, tmp)
        report["machine_after"] = _machine()
    import benchjson  # bench/ is the script's directory

    return benchjson.emit(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
