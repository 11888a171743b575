"""Shared fixtures of the EXPORT / DEPLOY tests: a tiny trained run and a constructed model.

* :func:`tiny_run` trains the "tiny" preset's student with cross-entropy for one epoch on the
  conftest prep (MFCC-26), with the given feature normalisation, then replaces its classifier
  by a fixed random projection of the standardised embedding and saves that as the final
  checkpoint (one epoch leaves the probabilities within ~1e-3 of each other for every input,
  which would let a comparison at 1e-4 pass with wrong features; now they span most of
  [0, 1]), and scores it (``results.json``), so an export has everything ``model.json``
  records. Cached per session.
* :func:`band_model_folder` writes an exported-model folder by hand (``model.onnx`` built with
  ``onnx.helper`` + ``model.json``): log-mel 40 at 16 kHz, no normalisation, and logits
  ``scale * mean over time of the log-mel band that holds tone c``. Its label on a window is
  the tone that fills most of the window, so a stream of tones has known label times.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_RUNS: dict[tuple[str, str], Path] = {}


def tiny_run(prep_dir: Path, tmp_path_factory, *, normalization: str = "global") -> Path:
    """Workdir of a tiny CE student trained for one epoch on ``prep_dir`` and scored."""
    key = (str(prep_dir), normalization)
    if key not in _RUNS:
        from dkd_jax import config as config_lib
        from dkd_jax import eval_lib, train_lib

        cfg = config_lib.apply_overrides(
            config_lib.get_config("tiny"),
            [
                f"data.prep_dir={prep_dir}",
                f"data.normalization={normalization}",
                "model.role=student",
                "kd.loss=ce",
                "optim.num_epochs=1",
            ],
        )
        workdir = tmp_path_factory.mktemp(f"tiny_run_{normalization}") / "run"
        train_lib.train_and_evaluate(cfg, workdir)
        _spread_outputs(workdir, prep_dir)
        eval_lib.evaluate_run(workdir, write=True, plot=False, verbose=False)
        _RUNS[key] = workdir
    return _RUNS[key]


def spread_classifier(model, variables, x: np.ndarray) -> dict:
    """Classifier params: a fixed random projection of the embedding, standardised on ``x``.

    ``x`` [N, F, T] are (normalised) windows; the logits on them then have mean 0 and a
    spread of a few units per class, so probabilities vary visibly with the input.
    """
    import jax

    def embedding(variables, x):  # jitted: eager apply compiles every operation on its own
        _, inter = model.apply(variables, x, train=False, mutable=["intermediates"])
        return inter["intermediates"]["embedding"][0]

    emb = np.asarray(jax.jit(embedding)(variables, x[..., None]), np.float64)
    proj = np.random.default_rng(0).standard_normal((emb.shape[1], model.num_classes))
    kernel = proj / np.maximum(emb.std(axis=0), 1e-6)[:, None]
    bias = -emb.mean(axis=0) @ kernel
    return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}


def _spread_outputs(workdir: Path, prep_dir: Path) -> None:
    from dkd_jax import checkpointing, input_pipeline, records, run_dir

    run = run_dir.restore_run(workdir)
    arrays = input_pipeline.normalize_arrays(
        records.load_split(prep_dir, "eval"), run.normalization
    )
    classifier = spread_classifier(run.model, run.variables, arrays.features)
    ckpt = checkpointing.Checkpointer(workdir / run_dir.CHECKPOINT_DIR, max_to_keep=100)
    try:
        step = ckpt.latest_step()
        state, meta = ckpt.restore(step)
        state["params"]["classifier"] = classifier
        ckpt.save(step, state, meta)
    finally:
        ckpt.close()


BAND_TONES_HZ = (250.0, 700.0, 1500.0, 3000.0)
BAND_LABELS = ("low", "mid", "high", "top")


def band_model_folder(out: Path, *, scale: float = 4.0) -> Path:
    """A hand-made exported folder whose class c is 'the tone BAND_TONES_HZ[c] dominates'."""
    import onnx
    from onnx import TensorProto, helper

    from dkd_jax import audio

    fc = audio.FEATURE_PRESETS["logmel40"]
    fb = audio.mel_filterbank(
        sample_rate=fc.sample_rate, n_fft=fc.n_fft, n_mels=fc.n_mels, fmin=fc.fmin, fmax=fc.fmax
    )
    weights = np.zeros((fc.n_mels, len(BAND_TONES_HZ)), np.float32)
    for c, hz in enumerate(BAND_TONES_HZ):
        weights[int(np.argmax(fb[:, round(hz * fc.n_fft / fc.sample_rate)])), c] = scale
    f, t = fc.segment_shape
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["features", "axes"], ["m"], keepdims=0),  # [B, F, 1]
            helper.make_node("Reshape", ["m", "shape"], ["flat"]),  # [B, F]
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        ],
        "band_model",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", f, t, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(BAND_LABELS)])],
        initializer=[
            helper.make_tensor("axes", TensorProto.INT64, [1], [2]),
            helper.make_tensor("shape", TensorProto.INT64, [2], [-1, f]),
            helper.make_tensor("w", TensorProto.FLOAT, list(weights.shape), weights.ravel()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out / "model.onnx")
    card = {
        "format_version": 1,
        "label_names": list(BAND_LABELS),
        "features": fc.to_dict(),
        "normalization": {"mode": "none"},
        "aggregation": {"rule": "mean_logits"},
        "files": {"onnx": {"path": "model.onnx", "opset": 18}},
    }
    (out / "model.json").write_text(json.dumps(card, indent=2))
    return out


def tone_sequence(
    order, seconds, *, sample_rate: int = 16000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated tones BAND_TONES_HZ[order[i]] of ``seconds[i]`` each (+ a little noise).

    Returns (wave [n] float32, boundaries [len(order) - 1] seconds).
    """
    rng = np.random.default_rng(seed)
    parts = []
    for c, sec in zip(order, seconds, strict=True):
        n = round(sec * sample_rate)
        t = np.arange(n) / sample_rate
        parts.append(0.3 * np.sin(2 * np.pi * BAND_TONES_HZ[c] * t + rng.uniform(0, 6.28)))
    wave = np.concatenate(parts) + 0.003 * rng.standard_normal(sum(p.shape[0] for p in parts))
    return wave.astype(np.float32), np.cumsum(seconds)[:-1]
