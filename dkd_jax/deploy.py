"""Run an exported model folder without JAX: audio files → emotion probabilities.

This module owns the deployed side of ``dkd_jax.export``: it reads ``model.json``, runs
``model.onnx`` with onnxruntime (:class:`OnnxClassifier`) and computes features with
:mod:`dkd_jax.audio` (NumPy and soxr). It must never import jax, flax or optax
(tests/test_deploy.py runs it with ``jax`` poisoned in ``sys.modules``); ``dkd_jax.predict``
(its file segmentation and table, JAX-free at import) and ``dkd_jax.jsonio`` are used as they
are.

:func:`predict_files` returns the dict of ``predict.predict_files`` (so
``predict.format_predictions`` prints the same table): every file's eval-layout windows,
normalised as the run was (the stored global statistics, or the statistics of the file, or of
the file's speaker group when the run normalised per speaker: :func:`normalize_segments`), and
the softmax of the mean window logits. Streams are in :mod:`dkd_jax.streaming`;
:func:`predict_cli` is ``eval.py predict --model``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dkd_jax import audio, jsonio, predict
from dkd_jax.predict import softmax

__all__ = [
    "CARD_FILE",
    "DeployError",
    "OnnxClassifier",
    "load_card",
    "normalize_segments",
    "predict_cli",
    "predict_files",
    "softmax",
]

CARD_FILE = "model.json"
ONNX_FILE = "model.onnx"
INSTALL_HINT = "pip install -e '.[export]'"
VAR_EPS = 1e-6  # input_pipeline's variance epsilon (model.json records it)


class DeployError(ValueError):
    """An exported folder or an input that cannot be used (the message names which and why)."""


# --------------------------------------------------------------------------------------------
# The exported folder
# --------------------------------------------------------------------------------------------


def load_card(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks ``model.json`` of an exported folder.

    Raises:
      DeployError: a missing, unreadable or malformed card, naming the file and the field: the
        labels, the feature config, the normalisation (mode, and for "global" one finite mean
        and one positive std per feature band) and the model files.
    """
    path = Path(model_dir) / CARD_FILE
    if not Path(model_dir).is_dir():
        problem = "not a folder" if Path(model_dir).exists() else "no such folder"
        raise DeployError(f"{model_dir}: {problem} (an exported folder: python -m dkd_jax.export)")
    if not path.exists():
        run_files = ("config.json", "split.json")
        is_run = all((Path(model_dir) / name).is_file() for name in run_files)
        hint = "; it is a training run: use --workdir, or export it first" if is_run else ""
        raise DeployError(
            f"{path}: missing (not a folder written by python -m dkd_jax.export{hint})"
        )
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeployError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise DeployError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(card, dict):
        raise DeployError(f"{path}: a JSON object expected, got {type(card).__name__}")
    missing = [k for k in ("label_names", "features", "normalization", "files") if k not in card]
    if missing:
        raise DeployError(f"{path}: missing keys {missing}")
    _check_card(path, card)
    return card


def _check_card(path: Path, card: dict[str, Any]) -> None:
    labels = card["label_names"]
    if not (
        isinstance(labels, list) and len(labels) >= 2 and all(isinstance(n, str) for n in labels)
    ):
        raise DeployError(f"{path}: label_names must be a list of at least 2 names, got {labels!r}")
    repeated = sorted({n for n in labels if labels.count(n) > 1})
    if repeated:  # one probability column per name: a repeat would hide a class
        raise DeployError(f"{path}: label_names repeats {', '.join(map(repr, repeated))}")
    try:
        cfg = feature_config(card)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise DeployError(f"{path}: features: {e}") from None
    files = card["files"]
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("path"), str) for v in files.values()
    ):
        raise DeployError(f'{path}: files must map each format to {{"path": FILE}}, got {files!r}')
    norm = card["normalization"]
    mode = norm.get("mode") if isinstance(norm, dict) else None
    if mode not in ("none", "global", "utterance"):
        raise DeployError(
            f"{path}: normalization.mode must be none, global or utterance, got {norm!r}"
        )
    if mode == "global":
        bands = cfg.segment_shape[0]
        for key in ("mean", "std"):
            try:
                values = np.asarray(norm.get(key), np.float64)
            except (TypeError, ValueError):
                values = np.zeros(0)
            ok = values.shape == (bands,) and np.isfinite(values).all()
            if not ok or (key == "std" and not (values > 0).all()):
                what = "finite" if key == "mean" else "positive"
                raise DeployError(
                    f"{path}: normalization.{key} must hold {bands} {what} numbers (one per "
                    f"feature band), got {str(norm.get(key))[:80]}"
                )


def feature_config(card: dict[str, Any]) -> audio.FeatureConfig:
    """The ``audio.FeatureConfig`` of a model card (short inputs are padded to one window)."""
    names = {f.name for f in dataclasses.fields(audio.FeatureConfig)}
    fc = audio.FeatureConfig.from_dict({k: v for k, v in card["features"].items() if k in names})
    return dataclasses.replace(fc, short_utterances="pad")


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise DeployError(f"onnxruntime is not installed: {INSTALL_HINT}") from None
    return onnxruntime


class OnnxClassifier:
    """An exported folder, loaded: model card, feature config and an onnxruntime session.

    Args:
        model_dir: a folder written by ``python -m dkd_jax.export`` (with ``model.onnx``).
        threads: onnxruntime intra-op threads (default: onnxruntime's, all cores).
        batch_size: windows per onnxruntime call.
    """

    def __init__(
        self, model_dir: str | os.PathLike, *, threads: int | None = None, batch_size: int = 256
    ):
        self.model_dir = Path(model_dir)
        self.card = load_card(model_dir)
        if "onnx" not in self.card["files"]:
            raise DeployError(f"{self.model_dir}: the export has no ONNX model (--format onnx)")
        path = self.model_dir / self.card["files"]["onnx"]["path"]
        if not path.exists():
            raise DeployError(f"{path}: missing")
        try:  # onnxruntime would say only "system error number 13"
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise DeployError(f"{path}: cannot read it ({e.strerror or e})") from None
        recorded = self.card["files"]["onnx"].get("sha256")
        if recorded and hashlib.sha256(data).hexdigest() != recorded:
            raise DeployError(
                f"{path}: its sha256 is not the one {CARD_FILE} records: the file changed after "
                "the export (damaged, or replaced by another model's); export the run again"
            )
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                os.fspath(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise DeployError(f"{path}: onnxruntime cannot load it ({e})") from None
        self.label_names = list(self.card["label_names"])
        self.features = feature_config(self.card)
        self.normalization = self.card["normalization"]
        self.batch_size = int(batch_size)
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name
        self._check_session(path)

    def _check_session(self, path: Path) -> None:
        """The ONNX graph takes the card's windows [N, F, T, 1] and gives one logit per label
        (a card edited or copied from another export would otherwise fail mid-prediction)."""
        want_in = (*self.features.segment_shape, 1)
        got_in = tuple(self.session.get_inputs()[0].shape[1:])
        got_out = self.session.get_outputs()[0].shape[-1]
        bad_in = len(got_in) != 3 or any(
            isinstance(g, int) and g != w for g, w in zip(got_in, want_in, strict=False)
        )
        bad_out = isinstance(got_out, int) and got_out != len(self.label_names)
        if bad_in or bad_out:
            raise DeployError(
                f"{path}: the model takes windows [N, {', '.join(map(str, got_in))}] and gives "
                f"{got_out} logits, but {self.model_dir / CARD_FILE} describes windows "
                f"[N, {', '.join(map(str, want_in))}] and {len(self.label_names)} labels"
            )

    def logits(self, segments: np.ndarray) -> np.ndarray:
        """Logits [N, C] float32 of normalised windows [N, F, T]."""
        x = np.asarray(segments, np.float32)
        if x.ndim != 3 or x.shape[1:] != self.features.segment_shape:
            raise DeployError(
                f"windows must be [N, {self.features.segment_shape[0]}, "
                f"{self.features.segment_shape[1]}], got {x.shape}"
            )
        out = [
            self.session.run([self._output], {self._input: x[i : i + self.batch_size, ..., None]})[
                0
            ]
            for i in range(0, x.shape[0], self.batch_size)
        ]
        if not out:
            return np.zeros((0, len(self.label_names)), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Normalisation (numpy twin of input_pipeline's, for one input at a time)
# --------------------------------------------------------------------------------------------


def window_moments(
    segments: np.ndarray, valid_frames: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Frame count and per-band sum / sum of squares (float64) over the real frames of windows.

    A frame in several overlapping windows counts once per window (as in training).
    """
    x = np.asarray(segments, np.float64)
    mask = np.arange(x.shape[2])[None, None, :] < np.asarray(valid_frames)[:, None, None]
    xm = np.where(mask, x, 0.0)
    return float(mask.sum()), xm.sum(axis=(0, 2)), (xm * xm).sum(axis=(0, 2))


def moments_to_stats(
    count: float, total: np.ndarray, total_sq: np.ndarray, *, epsilon: float = VAR_EPS
):
    """(mean [F], std [F]) float32 from :func:`window_moments` (``std = sqrt(var + eps)``)."""
    c = max(count, 1.0)
    mean = total / c
    var = np.maximum(total_sq / c - mean * mean, 0.0)
    return mean.astype(np.float32), np.sqrt(var + epsilon).astype(np.float32)


def normalize_segments(
    segments: np.ndarray,
    valid_frames: np.ndarray,
    normalization: dict[str, Any],
    *,
    moments: tuple | None = None,
) -> np.ndarray:
    """Normalises one input's windows [N, F, T] as ``model.json``'s ``normalization`` says.

    "global": the stored training mean/std per band; "utterance": the statistics over the real
    frames of the input's windows, or of all the windows of its speaker group (``moments``, the
    summed :func:`window_moments` of the group's files); "none": unchanged.
    """
    mode = normalization.get("mode", "none")
    x = np.asarray(segments, np.float32)
    if mode == "none":
        return x
    if mode == "global":
        mean = np.asarray(normalization["mean"], np.float32)
        std = np.asarray(normalization["std"], np.float32)
    elif mode == "utterance":
        eps = float(normalization.get("variance_epsilon", VAR_EPS))
        moments = moments if moments is not None else window_moments(x, valid_frames)
        mean, std = moments_to_stats(*moments, epsilon=eps)
    else:
        raise DeployError(f"{CARD_FILE}: unknown normalization mode {mode!r}")
    return ((x - mean[:, None]) / std[:, None]).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def predict_files(
    model: OnnxClassifier | str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    *,
    segments: bool = False,
    threads: int | None = None,
    groups: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """Emotion probabilities of audio files with an exported model (no JAX).

    Returns the dict of ``predict.predict_files`` (``label_names``, ``normalization``,
    ``files``, ``errors``, ``warnings``): same windows, same normalisation rule (the files of
    one speaker ``groups`` entry normalised together when the run normalised per speaker),
    softmax of the mean window logits.
    """
    clf = model if isinstance(model, OnnxClassifier) else OnnxClassifier(model, threads=threads)
    names, fc, norm = clf.label_names, clf.features, clf.normalization
    if groups is not None and len(groups) != len(paths):
        raise DeployError(f"{len(groups)} group names for {len(paths)} files")
    paths, groups, repeat_warnings, error = predict.unique_inputs(paths, groups)
    if error:
        raise DeployError(error)
    per_speaker = norm.get("trained_with") == "speaker"
    out: dict[str, Any] = {
        "label_names": names,
        "normalization": norm.get("trained_with", norm.get("mode", "none")),
        "files": [],
        "errors": [],
        "warnings": repeat_warnings,
    }
    if per_speaker and (alone := predict.ungrouped_warning("the model was trained", paths, groups)):
        out["warnings"].append(alone)
    done = []
    for path, group in zip(paths, groups, strict=True):
        try:
            seg = predict.file_segments(path, fc)
        except audio.AudioError as e:
            out["errors"].append({"path": path, "error": str(e)})
            continue
        done.append((path, group, seg))
        out["warnings"] += predict.input_warnings(path, seg)
    moments: dict[str, tuple] = {}
    if per_speaker:
        for _, group, seg in done:
            if group:
                m = window_moments(seg["segments"], seg["valid_frames"])
                old = moments.get(group)
                moments[group] = (
                    m if old is None else tuple(a + b for a, b in zip(old, m, strict=True))
                )
    for path, group, seg in done:
        x = normalize_segments(
            seg["segments"], seg["valid_frames"], norm, moments=moments.get(group or "")
        )
        entry = predict.file_entry(
            path, seg, clf.logits(x), names, fc.window_seconds, segments=segments
        )
        entry["group"] = group
        out["files"].append(entry)
    return out


# --------------------------------------------------------------------------------------------
# eval.py predict --model
# --------------------------------------------------------------------------------------------


def predict_cli(args, files: Sequence[str], groups: Sequence[str | None]) -> int:
    """``eval.py predict --model DIR FILE ...``; returns the exit status (streams:
    ``streaming.stream_cli``).

    ``args`` is eval.py's parsed predict namespace (model, threads, segments, json_out);
    ``files`` and ``groups`` its files and their speaker groups.
    """
    try:
        model = OnnxClassifier(args.model, threads=args.threads)
        if not files:
            raise DeployError("no audio files given (or use --stream PATH|-)")
        pred = predict_files(model, files, segments=args.segments, groups=groups)
    except (DeployError, audio.AudioError, OSError) as e:
        print(f"eval.py: error: {cli_error(e)}", file=sys.stderr)
        return 2
    return predict.report_predictions(pred, json_out=args.json_out)


def cli_error(e: Exception) -> str:
    """One line for a command-line error (an OSError as ``PATH: reason``)."""
    return jsonio.describe_os_error(e) if isinstance(e, OSError) else str(e)
