"""Export a trained run as a self-contained folder: ONNX, StableHLO and ``model.json``.

``python -m dkd_jax.export --workdir RUN --out DIR [--step N | --best] [--format onnx,stablehlo]``
writes into ``DIR``:

``model.onnx``
    the network in inference mode (BatchNorm running statistics folded into the convolutions),
    input ``features [batch, freq, time, 1]`` float32 with a symbolic ``batch``, output
    ``logits [batch, num_classes]``; standard ``ai.onnx`` operators only (opset ``--opset``), so
    any ONNX runtime runs it. Made with ``jax2onnx`` from the Flax model, then BatchNorm folding
    and constant folding by onnxruntime's *basic* graph optimisations (semantics-preserving,
    hardware-independent), saved without onnxruntime-specific operators.
``model.stablehlo``
    ``jax.export`` serialisation of the same function (symbolic batch dimension, lowered for
    CPU, CUDA and TPU): ``jax.export.deserialize(data).call(x)`` runs it without this repository.
``model.json``
    what the folder needs to be used on its own (:func:`model_card`): label names, the feature
    front end, the feature normalisation, the aggregation rule, the source run (workdir, step,
    config hash, data hash) and its test WA/UA when the run's ``results.json`` scored this
    very model (same checkpoint, mean of window logits), plus the parity of each exported file
    with the Flax model on random inputs.

The ONNX path needs the optional extra (``pip install -e '.[export]'``: jax2onnx, onnx,
onnxruntime); it is imported only here, and a missing extra is a one-line error naming that
command. :mod:`dkd_jax.deploy` runs an exported folder without JAX.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dkd_jax import jsonio

__all__ = [
    "CARD_FILE",
    "FORMATS",
    "ONNX_FILE",
    "STABLEHLO_FILE",
    "ExportError",
    "export_run",
    "inference_function",
    "load_stablehlo",
    "model_card",
    "restore",
    "to_onnx",
    "to_stablehlo",
]

ONNX_FILE = "model.onnx"
STABLEHLO_FILE = "model.stablehlo"
CARD_FILE = "model.json"
STAGE_DIR = ".export.partial"  # where an export writes before its files replace the old ones
FORMATS = ("onnx", "stablehlo")
CARD_VERSION = 1
DEFAULT_OPSET = 18
MIN_OPSET = 18  # jax2onnx 0.13 emits ReduceMean with its axes as an input (opset 18 form)
STABLEHLO_PLATFORMS = ("cpu", "cuda", "tpu")
INPUT_NAME = "features"
OUTPUT_NAME = "logits"
INSTALL_HINT = "pip install -e '.[export]'"
_PARITY_BATCH = 8


class ExportError(ValueError):
    """A run that cannot be exported, or a missing extra (the message says which and why)."""


# --------------------------------------------------------------------------------------------
# The function that is exported
# --------------------------------------------------------------------------------------------


def restore(workdir: str | os.PathLike, *, step: int | None = None, best: bool = False):
    """The run's ``RestoredRun`` (config, model, variables, step, normalisation, data info).

    The one place this module (and ``bench/latency.py``) restores a checkpoint.

    Raises:
        ExportError: not a run directory, or no such checkpoint.
    """
    from dkd_jax import run_dir

    try:
        run = run_dir.restore_run(workdir, step=step, best=best)
    except run_dir.RunDirError as e:
        raise ExportError(str(e)) from None
    if run.warning:
        print(f"{_PROG}: warning: {run.warning}", file=sys.stderr)
    return run


def inference_function(model, variables: dict[str, Any]) -> Callable:
    """``features [B, F, T, 1] -> logits [B, C]`` in inference mode, variables as constants.

    BatchNorm uses its running statistics and area attention has no dropout (``train=False``).
    A bfloat16/float16 model is exported in float32 (the parameters are float32 anyway), and a
    model trained with ``conv_algorithm="taps"`` (a CPU speed choice, :mod:`dkd_jax.conv_taps`)
    with standard convolutions: the same function to float32 rounding, and one ``Conv``
    operator per layer in the ONNX graph rather than a chain of slices, products and sums.
    """
    model, consts = _inference_model(model, variables)

    def logits(features):
        return model.apply(consts, features, train=False)

    return logits


def _inference_model(model, variables: dict[str, Any]):
    """(the float32, standard-convolution clone of ``model``, its inference variables)."""
    import jax.numpy as jnp

    model = model.clone(dtype=jnp.float32, conv_algorithm="xla")
    return model, {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def _reference_logits(model, variables: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """The parity reference: :func:`inference_function`'s logits with the variables passed as
    arguments, as training and evaluation run the model. Compiled with the variables as
    constants, XLA:CPU (jax 0.10.2) gave NaN or run-to-run different logits for a model whose
    conv kernels were constant-valued (tests/test_conv_taps.py), so the exported graphs are
    checked against this form rather than against themselves."""
    import jax

    model, consts = _inference_model(model, variables)
    return np.asarray(jax.jit(lambda v, f: model.apply(v, f, train=False))(consts, x))


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------


def _onnx_modules():
    try:
        import jax2onnx
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs the export extra ({e.name} is not installed): {INSTALL_HINT}; "
            "or export StableHLO only (--format stablehlo), which needs none of it"
        ) from None
    return jax2onnx, onnx, onnxruntime


@contextlib.contextmanager
def _quiet_converter():
    """jax2onnx 0.13 prints plugin debugging to stdout and logs tracebacks of plugins that do
    not import with this jax (dm_pix); none of it concerns MACNN."""
    loggers = [logging.getLogger(n) for n in ("jax2onnx", "onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # jax.core.DropVar in jax2onnx
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _fold_with_onnxruntime(proto, onnx, ort):
    """BatchNorm folding, constant folding and redundant-node removal by onnxruntime's basic
    (hardware-independent, semantics-preserving) graph optimisations; standard ops only."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = os.path.join(tmp, "folded.onnx")
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        folded = onnx.load(options.optimized_model_filepath)
    domains = {n.domain for n in folded.graph.node}
    if domains - {"", "ai.onnx"}:
        raise ExportError(f"onnx: optimised graph uses non-standard operator domains {domains}")
    kept = [o for o in folded.opset_import if o.domain in ("", "ai.onnx")]
    del folded.opset_import[:]
    folded.opset_import.extend(kept)
    del folded.graph.value_info[:]
    return folded


def to_onnx(
    fn: Callable,
    segment_shape: tuple[int, int],
    path: str | os.PathLike,
    *,
    name: str = "dkd_jax_macnn",
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Converts ``fn`` (``features [B, F, T, 1] -> logits``) to an ONNX file.

    Args:
        fn: the inference function (:func:`inference_function`).
        segment_shape: (F, T) of one feature window.
        path: output ``.onnx`` file.
        name: the ONNX graph name.
        opset: ONNX opset of the default domain.
        metadata: string key/values stored in the model's ``metadata_props``.

    Returns:
        The path written.

    Raises:
        ExportError: the export extra is missing, or the folded graph is not standard ONNX.
    """
    jax2onnx, onnx, ort = _onnx_modules()
    freq, time = segment_shape
    with _quiet_converter():
        proto = jax2onnx.to_onnx(
            _inline_nested_jits(fn),
            [("batch", int(freq), int(time), 1)],
            model_name=name,
            opset=int(opset),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
        )
    # jax2onnx 0.13 records some intermediate shapes in NHWC for values that are NCHW;
    # onnxruntime re-infers them, so drop them rather than ship wrong annotations.
    del proto.graph.value_info[:]
    proto = _fold_with_onnxruntime(proto, onnx, ort)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, path)
    return path


def _inline_nested_jits(fn: Callable) -> Callable:
    """``fn`` traced with its inner ``jit`` calls inlined (the same operations, no nested calls).

    From jax 0.11 on, ``jnp.cumsum`` (area attention's summed-area table) reaches the converter
    as a nested ``jit`` equation, and jax2onnx 0.13.0's handler of those fails on jax 0.11/0.12
    (``Var.__init__``, ``core.ClosedJaxpr``). ``jax.disable_jit`` inside the traced function makes
    every inner ``jit`` trace its body into the outer graph instead. It also unrolls
    ``lax.map``/``scan`` loops into their iterations: with ``area_query_chunk_size`` set, the graph
    holds one copy of the attention per query chunk (the same numbers; tests/test_export.py).
    """
    import jax

    def inlined(features):
        with jax.disable_jit():
            return fn(features)

    return inlined


def onnx_logits(path: str | os.PathLike, features: np.ndarray) -> np.ndarray:
    """Runs an exported ONNX file on ``[B, F, T, 1]`` float32 features (onnxruntime, CPU)."""
    _, _, ort = _onnx_modules()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    x = np.asarray(features, np.float32)
    return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])


# --------------------------------------------------------------------------------------------
# StableHLO
# --------------------------------------------------------------------------------------------


def to_stablehlo(
    fn: Callable,
    segment_shape: tuple[int, int],
    path: str | os.PathLike,
    *,
    platforms: Sequence[str] = STABLEHLO_PLATFORMS,
) -> Path:
    """Serialises ``fn`` with ``jax.export`` (symbolic batch dimension ``batch``).

    Args:
        fn: the inference function (:func:`inference_function`).
        segment_shape: (F, T) of one feature window.
        path: output file (bytes of ``jax.export.Exported.serialize()``).
        platforms: platforms to lower for (one module serves all of them).
    """
    import jax
    import jax.numpy as jnp
    from jax import export as jax_export

    (batch,) = jax_export.symbolic_shape("batch")
    freq, time = segment_shape
    spec = jax.ShapeDtypeStruct((batch, int(freq), int(time), 1), jnp.float32)
    exported = jax_export.export(jax.jit(fn), platforms=tuple(platforms))(spec)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(exported.serialize())
    return path


def load_stablehlo(path: str | os.PathLike):
    """The ``jax.export.Exported`` of a ``model.stablehlo`` file; ``.call(features)`` runs it."""
    from jax import export as jax_export

    return jax_export.deserialize(bytearray(Path(path).read_bytes()))


# --------------------------------------------------------------------------------------------
# model.json
# --------------------------------------------------------------------------------------------


def _normalization_card(normalization: dict[str, Any], num_bins: int) -> dict[str, Any]:
    mode = normalization.get("mode", "none")
    if mode == "global":
        mean, std = normalization["mean"], normalization["std"]
        if len(mean) != num_bins or len(std) != num_bins:
            raise ExportError(
                f"normalization.json: {len(mean)} bands, the features have {num_bins}"
            )
        return {"mode": "global", "mean": list(mean), "std": list(std)}
    if mode in ("utterance", "speaker"):
        return {
            "mode": "utterance",
            "trained_with": mode,
            "variance_epsilon": 1e-6,
            "rule": "(x - mean) / sqrt(var + epsilon) per band, with the mean and variance of the "
            "real (non-padding) frames of all the input's windows (a file, or a stream so far); "
            "a new input's speaker is unknown, so it is its own group",
        }
    return {"mode": "none"}


def _test_scores(workdir: Path, step: int, best: bool) -> dict[str, Any] | None:
    """The run's test WA/UA for the card, only where ``results.json`` scored this very model.

    Scores of another step, of the best checkpoint for the latest (or the reverse), or of the
    mean of window *probabilities* (``eval.py --aggregate probs``) are not this export's: the
    card then says which step and rule were scored and why they are left out, with no ``wa``
    or ``ua`` a reader could take for the exported model's. None: the run was never scored.
    """
    from dkd_jax import run_dir

    try:
        res = run_dir.load_results(workdir)
    except run_dir.RunDirError as e:
        raise ExportError(str(e)) from None
    if res is None:
        return None
    res_best = res.get("checkpoint") == "best-by-validation"
    aggregation = res.get("aggregation")
    same_checkpoint = res.get("step") == step and res_best == best
    why = None
    if not same_checkpoint:
        scored = "best-by-validation, step" if res_best else "step"
        why = f"results.json scored {scored} {res.get('step')}, not this export's checkpoint"
    elif aggregation is not None and "logits" not in str(aggregation):
        why = f"results.json scored the {aggregation}; the export averages window logits"
    info = {
        "split": run_dir.split_name(res),
        "aggregation": aggregation,
        "scored_step": res.get("step"),
        "same_checkpoint": same_checkpoint,
    }
    if why is not None:
        return {**info, "not_this_model": why}
    return {
        "wa": res.get("wa"),
        "ua": res.get("ua"),
        "num_utterances": res.get("num_utterances"),
        **info,
    }


def _versions() -> dict[str, str | None]:
    out = {}
    for name in ("dkd-jax", "jax", "flax", "jax2onnx", "onnx", "onnxruntime"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def model_card(run, workdir: str | os.PathLike, *, best: bool = False) -> dict[str, Any]:
    """The ``model.json`` dict of a restored run (everything but the exported files).

    Args:
        run: ``restore(workdir)``.
        workdir: the run directory (for ``results.json``).
        best: whether the best-by-validation checkpoint was restored.
    """
    from dkd_jax import audio, models
    from dkd_jax import config as config_lib

    workdir = Path(workdir)
    fc_dict = run.data_info.get("feature_config")
    if not fc_dict:
        raise ExportError(f"{workdir}/split.json: the run records no feature config")
    fc = dataclasses.replace(audio.FeatureConfig.from_dict(fc_dict), short_utterances="pad")
    names = list(run.data_info.get("label_names") or [])
    if len(names) != run.model.num_classes:
        raise ExportError(
            f"{workdir}: {len(names)} label names for {run.model.num_classes} classes"
        )
    role = run.config.model.role
    arch = getattr(run.config.model, role)
    return {
        "format_version": CARD_VERSION,
        "label_names": names,
        "model": {
            "role": role,
            "architecture": dataclasses.asdict(arch),
            "attention": run.model.attention,
            "attention_heads": run.model.attention_heads,
            "attention_hidden": run.model.attention_hidden,
            "num_classes": run.model.num_classes,
            "num_parameters": models.count_parameters(run.variables["params"]),
            "input": {"name": INPUT_NAME, "shape": ["batch", *fc.segment_shape, 1]},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", run.model.num_classes]},
            "dtype": "float32",
            "batch_norm": "inference (running statistics)",
        },
        "features": {
            **fc.to_dict(),
            "num_bins": fc.num_bins,
            "frames_per_window": fc.frames_per_window,
            "window_samples": fc.window_samples,
            "log_floor": audio.LOG_FLOOR,
            "mfcc_amin": audio.MFCC_AMIN,
            "mfcc_top_db": audio.MFCC_TOP_DB,
            "front_end": audio.FRONT_END_VERSION,
        },
        "normalization": _normalization_card(run.normalization, fc.num_bins),
        "aggregation": {
            "rule": "mean_logits",
            "description": "a file's 2-s windows (hop eval_hop_seconds) are scored separately; "
            "its probabilities are the softmax of the mean window logits",
        },
        "source": {
            "workdir": os.path.abspath(workdir),
            "step": int(run.step),
            "checkpoint": run.checkpoint_label(best=best),
            "training_finished": run.training["finished"],
            "config_hash": config_lib.config_hash(run.config),
            "data_content_hash": run.data_info.get("content_hash"),
        },
        "test": _test_scores(workdir, int(run.step), best),
        "exported_with": _versions(),
        "files": {},
    }


# --------------------------------------------------------------------------------------------
# The whole folder
# --------------------------------------------------------------------------------------------


def _parity(reference: np.ndarray, x: np.ndarray, fmt: str, path: Path) -> float:
    if fmt == "onnx":
        got = onnx_logits(path, x)
    else:
        got = np.asarray(load_stablehlo(path).call(x))
    return float(np.max(np.abs(got - reference)))


def export_run(
    workdir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    step: int | None = None,
    best: bool = False,
    formats: Sequence[str] = FORMATS,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Exports a run's checkpoint into ``out_dir`` (see the module docstring).

    Args:
        workdir: a training workdir.
        out_dir: the folder to write (created; new or empty, or holding an earlier export
            to replace with ``overwrite``).
        step, best: which checkpoint (default: the latest).
        formats: any of ``FORMATS``.
        opset: ONNX opset.
        overwrite: replace the files of an earlier export in ``out_dir`` (only once the new
            ones are all written: a failed export leaves the earlier one as it was).

    Returns:
        The ``model.json`` dict that was written.

    Raises:
        ExportError: bad arguments, missing run files or extra, an ``out_dir`` that is a file
            or holds other files, or an earlier export without ``overwrite``.
    """
    if int(opset) < MIN_OPSET:
        raise ExportError(f"--opset: jax2onnx 0.13 needs opset >= {MIN_OPSET}, got {opset}")
    formats = list(dict.fromkeys(formats))
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ExportError(f"--format: choose from {','.join(FORMATS)}, got {','.join(formats)}")
    if "onnx" in formats:
        _, onnx, _ = _onnx_modules()  # fail before the slow part
        newest = onnx.defs.onnx_opset_version()
        if int(opset) > newest:
            raise ExportError(
                f"--opset {opset}: this onnx {onnx.__version__} knows opsets up to {newest}"
            )
    out = Path(out_dir)
    _check_out_dir(out, overwrite=overwrite)
    run = restore(workdir, step=step, best=best)
    card = model_card(run, workdir, best=best)
    fn = inference_function(run.model, run.variables)
    shape = tuple(card["model"]["input"]["shape"][1:3])
    x = np.random.default_rng(0).standard_normal((_PARITY_BATCH, *shape, 1)).astype(np.float32)
    reference = _reference_logits(run.model, run.variables, x)
    out.mkdir(parents=True, exist_ok=True)
    stage = out / STAGE_DIR  # the new files, moved into place only once all are written
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        card = _write_formats(card, fn, shape, stage, formats, opset, reference, x)
        for name in (ONNX_FILE, STABLEHLO_FILE, CARD_FILE):  # no stale files of an earlier export
            (out / name).unlink(missing_ok=True)
        for name in [f["path"] for f in card["files"].values()] + [CARD_FILE]:  # the card last
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return card


def _check_out_dir(out: Path, *, overwrite: bool) -> None:
    """An export goes into a new or empty folder, or replaces an earlier export with
    ``overwrite``; never into a folder of other files (``--overwrite`` would mix them)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    if not out.exists() or not any(
        p.name != STAGE_DIR and not p.name.startswith(".") for p in out.iterdir()
    ):
        return  # new, empty (hidden files aside: .gitkeep), or left by a stopped export
    if not (out / CARD_FILE).is_file():
        raise ExportError(
            f"{out}: not empty and holds no earlier export ({CARD_FILE} missing); choose an "
            "empty or new folder"
        )
    if not overwrite:
        raise ExportError(f"{out}: holds an earlier export (pass --overwrite to replace it)")


def _write_formats(card, fn, shape, out: Path, formats, opset, reference, x) -> dict[str, Any]:
    """Writes each format and the card into ``out``, with the parity check of each."""
    parity = {}
    for fmt in formats:
        if fmt == "onnx":
            meta = {
                "label_names": json.dumps(card["label_names"]),
                "source": json.dumps(card["source"]),
            }
            path = to_onnx(fn, shape, out / ONNX_FILE, opset=opset, metadata=meta)
            card["files"]["onnx"] = {"path": ONNX_FILE, "opset": int(opset)}
        else:
            path = to_stablehlo(fn, shape, out / STABLEHLO_FILE)
            card["files"]["stablehlo"] = {
                "path": STABLEHLO_FILE,
                "platforms": list(STABLEHLO_PLATFORMS),
                "load": "jax.export.deserialize(open(path, 'rb').read()).call(features)",
            }
        card["files"][fmt]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        parity[fmt] = _parity(reference, x, fmt, path)
    card["export_check"] = {
        "inputs": f"{_PARITY_BATCH} windows of N(0, 1) noise (seed 0)",
        "max_abs_logit_difference": parity,
        "max_abs_logit": float(np.max(np.abs(reference))),  # the scale to read them against
    }
    jsonio.write_text(out / CARD_FILE, json.dumps(card, indent=2) + "\n")
    return card


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

_PROG = "python -m dkd_jax.export"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=_PROG,
        description="Export a trained run as a self-contained folder (model.onnx, "
        "model.stablehlo, model.json) that runs without JAX (ONNX) or with JAX alone (StableHLO).",
    )
    p.add_argument("--workdir", required=True, help="training workdir of the run")
    p.add_argument("--out", required=True, help="output folder")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    which.add_argument("--best", action="store_true", help="best-by-validation checkpoint")
    p.add_argument(
        "--format", default=",".join(FORMATS), help="comma-separated: onnx,stablehlo (default both)"
    )
    p.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        card = export_run(
            args.workdir,
            args.out,
            step=args.step,
            best=args.best,
            formats=[f.strip() for f in args.format.split(",") if f.strip()],
            opset=args.opset,
            overwrite=args.overwrite,
        )
    except ExportError as e:
        print(f"{_PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{_PROG}: error: {jsonio.describe_os_error(e)}", file=sys.stderr)
        return 2
    files = ", ".join(f["path"] for f in card["files"].values())
    test = card["test"]
    scores = ""
    if test and "wa" in test:
        scores = f"; test WA {100 * test['wa']:.2f} %, UA {100 * test['ua']:.2f} %"
    check = card["export_check"]
    diffs = ", ".join(f"{fmt} {d:.2g}" for fmt, d in check["max_abs_logit_difference"].items())
    print(
        f"wrote {args.out}: {files}, {CARD_FILE} (step {card['source']['step']}, "
        f"{card['model']['num_parameters']:,} parameters{scores}); max |logit difference| vs "
        f"Flax: {diffs} (largest |logit| {check['max_abs_logit']:.3g})"
    )
    if test and "not_this_model" in test:
        print(f"{_PROG}: note: no test WA/UA in {CARD_FILE}: {test['not_this_model']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
