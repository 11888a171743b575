"""Input pipeline: prep-dir segments → normalised numpy arrays → per-device batches.

This module owns how training and evaluation data reach the devices (no TensorFlow):

* :func:`load_run_data` is the one call a training run makes: its training segments, its
  held-out sets (:class:`EvalSet`, also built by :func:`load_eval_set` for ``eval.py``) and the
  normalisation fitted on the training segments;
* :func:`load_segments` reads one segment layout of a prep dir (``records.load_split``), keeps
  the utterances of a split, and (multi-host) this process's share of the shards;
* feature normalisation (:func:`fit_normalization`, :func:`normalize_arrays`): per feature bin,
  over the *real* frames of each segment (``valid_frames``), "global" (training statistics,
  stored with the run), "utterance" or "speaker" (each group's own statistics); statistics are
  summed over processes so every host normalises alike;
* the data order: :func:`epoch_order` draws the permutation of an epoch with
  ``jax.random.permutation(fold_in(fold_in(rng, epoch), process_index), N)`` and cuts it into
  ``[steps, local_batch]`` index rows; the last partial batch is filled with copies of real
  segments from the start of the permutation (so BatchNorm statistics only ever see real data)
  and carries ``mask = False`` there (so those copies get zero loss weight). Nothing is dropped.
  The on-device epoch loop (``train_lib``) calls the same function inside its compiled loop, and
  :func:`iterate_batches` (the streaming path) runs it on the host, so both paths see the same
  batches;
* :func:`iterate_batches` gathers host batches ``[local_devices, per_device, ...]`` in a
  background thread (one batch ahead of the device).

Batches are dicts: ``features [D, P, F, T] f32``, ``labels [D, P] i32``, ``mask [D, P] bool``
and, when the teacher's logits are precomputed, ``teacher_logits [D, P, C] f32``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dkd_jax import distributed, records

__all__ = [
    "NORMALIZATION_MODES",
    "EvalSet",
    "RunData",
    "TrainArrays",
    "epoch_order",
    "fit_normalization",
    "group_moments",
    "iterate_batches",
    "load_eval_set",
    "load_run_data",
    "load_segments",
    "moments_to_stats",
    "normalize_arrays",
    "normalize_features",
    "steps_per_epoch",
]

NORMALIZATION_MODES = ("none", "global", "utterance", "speaker")
_VAR_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_segments(
    prep_dir: str | os.PathLike,
    layout: str,
    utterance_ids: Sequence[str],
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> records.SegmentArrays:
    """Segments of the given utterances from one layout of a prep dir.

    Args:
      prep_dir: prep directory.
      layout: "train" (hop train_hop_seconds) or "eval" (hop eval_hop_seconds).
      utterance_ids: utterances to keep.
      process_index, process_count: multi-host share. With at least as many shards as
        processes, each process reads every ``process_count``-th shard; otherwise every process
        reads all shards and keeps every ``process_count``-th segment.

    Returns:
      SegmentArrays of this process's share, in file order.
    """
    meta = records.load_metadata(prep_dir)
    num_files = len(records.split_files(meta, layout))
    if process_count > 1 and num_files >= process_count:
        arrays = records.load_split(
            prep_dir, layout, shard_index=process_index, shard_count=process_count
        )
        share = None
    else:
        arrays = records.load_split(prep_dir, layout)
        share = process_count > 1
    keep = np.isin(arrays.utterance_ids, np.asarray(list(utterance_ids), dtype=str))
    arrays = arrays.select(keep)
    if share:
        arrays = arrays.select(np.arange(process_index, len(arrays), process_count))
    return arrays


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


def _frame_mask(valid_frames: np.ndarray, num_frames: int) -> np.ndarray:
    return np.arange(num_frames)[None, :] < np.asarray(valid_frames)[:, None]  # [N, T]


def group_moments(
    features: np.ndarray, valid_frames: np.ndarray, group_index: np.ndarray, num_groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group frame counts and per-bin sums over the real frames of each segment.

    Args:
      features: [N, F, T] float32 segments.
      valid_frames: [N] int real (non-padding) frames of each segment.
      group_index: [N] int group of each segment in [0, num_groups).
      num_groups: G.

    Returns:
      count [G] float64, sum [G, F] float64, sum of squares [G, F] float64.
    """
    n, f, t = features.shape
    count = np.zeros((num_groups,), np.float64)
    total = np.zeros((num_groups, f), np.float64)
    total_sq = np.zeros((num_groups, f), np.float64)
    chunk = 4096
    for start in range(0, n, chunk):
        x = features[start : start + chunk].astype(np.float64)
        m = _frame_mask(valid_frames[start : start + chunk], t)[:, None, :]  # [n, 1, T]
        g = group_index[start : start + chunk]
        xm = np.where(m, x, 0.0)
        np.add.at(count, g, m.sum(axis=(1, 2)))
        np.add.at(total, g, xm.sum(axis=2))
        np.add.at(total_sq, g, (xm * xm).sum(axis=2))
    return count, total, total_sq


def moments_to_stats(
    count, total, total_sq, *, eps: float = _VAR_EPS
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group (mean, std) [G, F] from :func:`group_moments`' sums; std = sqrt(var + eps)."""
    c = np.maximum(count, 1.0)[:, None]
    mean = total / c
    var = np.maximum(total_sq / c - mean * mean, 0.0)
    return mean, np.sqrt(var + eps)


def _groups_of(arrays: records.SegmentArrays, mode: str) -> np.ndarray:
    if mode == "utterance":
        return arrays.utterance_ids
    if mode == "speaker":
        return arrays.speakers
    return np.zeros((len(arrays),), dtype="<U1")


def fit_normalization(
    arrays: records.SegmentArrays, mode: str, *, group_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Statistics of a normalisation mode.

    Args:
      arrays: the segments whose statistics are used ("global": the training segments).
      mode: one of NORMALIZATION_MODES.
      group_names: all group names in a fixed order (needed with several processes so that
        every process sums the same [G, F] arrays); default the groups present in ``arrays``.

    Returns:
      ``{"mode": mode}`` plus, for "global", ``"mean"``/``"std"`` lists [F]; for "utterance" and
      "speaker", ``"groups"`` {name: {"mean", "std"}} of the groups present.
    """
    if mode not in NORMALIZATION_MODES:
        raise ValueError(f"unknown normalization {mode!r}; known: {NORMALIZATION_MODES}")
    if mode == "none":
        return {"mode": "none"}
    groups = _groups_of(arrays, mode)
    names = sorted(set(groups.tolist())) if group_names is None else list(group_names)
    if mode == "global":
        names = [""]
    lookup = {name: i for i, name in enumerate(names)}
    try:
        gi = np.array([lookup[g] for g in groups.tolist()], np.int64)
    except KeyError as e:
        raise ValueError(f"normalization group {e} is not in group_names") from None
    count, total, total_sq = group_moments(arrays.features, arrays.valid_frames, gi, len(names))
    count, total, total_sq = (distributed.over_processes(a) for a in (count, total, total_sq))
    mean, std = moments_to_stats(count, total, total_sq)
    if mode == "global":
        if count[0] == 0:
            raise ValueError("global normalization: no training frames to compute statistics")
        return {"mode": "global", "mean": mean[0].tolist(), "std": std[0].tolist()}
    present = count > 0
    return {
        "mode": mode,
        "groups": {
            name: {"mean": mean[i].tolist(), "std": std[i].tolist()}
            for i, name in enumerate(names)
            if present[i]
        },
    }


def normalize_features(
    features: np.ndarray, mean: np.ndarray, std: np.ndarray, group_index: np.ndarray | None = None
) -> np.ndarray:
    """(features - mean) / std per bin; with ``group_index``, row g of mean/std per segment.

    Args:
      features: [N, F, T] float32.
      mean, std: [F] or [G, F].
      group_index: [N] int rows of mean/std (only with [G, F] statistics).

    Returns:
      [N, F, T] float32.
    """
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    if group_index is not None:
        mean, std = mean[group_index], std[group_index]  # [N, F]
    return ((features - mean[..., None]) / std[..., None]).astype(np.float32)


def normalize_arrays(
    arrays: records.SegmentArrays, normalization: Mapping[str, Any]
) -> records.SegmentArrays:
    """Applies a run's normalisation to segments (training, evaluation or new audio).

    "none" returns ``arrays``; "global" uses the stored training statistics; "utterance" and
    "speaker" use the stored statistics of a group when present, and otherwise compute the
    group's statistics from the given segments (held-out utterances and speakers, new audio).

    Args:
      arrays: segments to normalise.
      normalization: the dict of :func:`fit_normalization` (``normalization.json`` of a run).

    Returns:
      A copy of ``arrays`` with normalised features (padding frames are normalised too).
    """
    mode = normalization.get("mode", "none")
    if mode not in NORMALIZATION_MODES:
        raise ValueError(f"unknown normalization {mode!r}; known: {NORMALIZATION_MODES}")
    if mode == "none" or len(arrays) == 0:
        return arrays
    if mode == "global":
        feats = normalize_features(arrays.features, normalization["mean"], normalization["std"])
        return dataclasses.replace(arrays, features=feats)
    groups = _groups_of(arrays, mode)
    stored = normalization.get("groups", {})
    missing = sorted(set(groups.tolist()) - set(stored))
    if missing:
        extra = fit_normalization(
            arrays.select(np.isin(groups, np.asarray(missing, dtype=str))), mode
        )["groups"]
        stored = {**stored, **extra}
    names = sorted(set(groups.tolist()))
    lookup = {name: i for i, name in enumerate(names)}
    gi = np.array([lookup[g] for g in groups.tolist()], np.int64)
    mean = np.array([stored[n]["mean"] for n in names], np.float32)
    std = np.array([stored[n]["std"] for n in names], np.float32)
    feats = normalize_features(arrays.features, mean, std, gi)
    return dataclasses.replace(arrays, features=feats)


# --------------------------------------------------------------------------------------------
# The data of a run
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalSet:
    """Held-out segments of one split, normalised, ready for ``eval_lib.score_eval_set``.

    Attributes:
      name: "test" or "validation".
      features: [N, F, T] float32 normalised eval-layout segments.
      labels: [N] int32 label of each segment (its utterance's).
      utterance_ids: [N] str utterance of each segment.
      num_unscored: utterances of the split with no segment (e.g. dropped short utterances).
    """

    name: str
    features: np.ndarray
    labels: np.ndarray
    utterance_ids: np.ndarray
    num_unscored: int = 0

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_eval_set(
    prep_dir: str | os.PathLike,
    name: str,
    utterance_ids: Sequence[str],
    normalization: Mapping[str, Any],
) -> EvalSet:
    """The eval-layout segments of ``utterance_ids``, normalised with a run's normalisation."""
    arrays = load_segments(prep_dir, "eval", utterance_ids)
    arrays = normalize_arrays(arrays, normalization)
    found = set(arrays.utterance_ids.tolist())
    return EvalSet(
        name=name,
        features=arrays.features,
        labels=arrays.labels.astype(np.int32),
        utterance_ids=arrays.utterance_ids,
        num_unscored=len(set(utterance_ids) - found),
    )


@dataclasses.dataclass
class RunData:
    """Everything a training run reads from the prep dir.

    Attributes:
      train: this process's share of the training segments (train layout), normalised.
      num_train_global: training segments over all processes.
      eval_sets: the non-empty held-out sets ("test", then "validation"), normalised.
      normalization: what the run stores in ``normalization.json`` and applies to every input
        later: "global" statistics, the *training speakers'* statistics ("speaker": a held-out
        utterance of a training speaker is normalised like its training data), or just the
        mode ("utterance": every utterance normalises itself; unseen speakers too).
    """

    train: records.SegmentArrays
    num_train_global: int
    eval_sets: list[EvalSet]
    normalization: dict[str, Any]


def load_run_data(
    prep_dir: str | os.PathLike,
    metadata: Mapping[str, Any],
    split,
    *,
    normalization: str,
    process_index: int = 0,
    process_count: int = 1,
) -> RunData:
    """Reads a run's training and held-out segments and fits its feature normalisation.

    The statistics come from the training segments only (summed over processes, so every host
    normalises alike); "speaker" and "utterance" groups are named from the metadata so that every
    process sums the same arrays.

    Args:
      prep_dir: the prep directory.
      metadata: its ``metadata.json``.
      split: the run's ``protocols.Split``.
      normalization: one of NORMALIZATION_MODES.
      process_index, process_count: multi-host share of the training segments.

    Raises:
      records.DataError: no training segments.
    """
    train = load_segments(
        prep_dir,
        "train",
        split.train_ids,
        process_index=process_index,
        process_count=process_count,
    )
    num_global = int(distributed.over_processes(len(train)))
    if num_global == 0:
        raise records.DataError(f"{prep_dir}: no training segments for split {split.name}")
    groups = None
    if normalization == "speaker":
        groups = sorted({str(u["speaker"]) for u in metadata["utterances"]})
    elif normalization == "utterance":
        groups = sorted(split.train_ids)
    fitted = fit_normalization(train, normalization, group_names=groups)
    train = normalize_arrays(train, fitted)
    saved = {k: v for k, v in fitted.items() if k != "groups" or normalization == "speaker"}
    eval_sets = []
    for name, ids in (("test", split.test_ids), ("validation", split.validation_ids)):
        if not ids:
            continue
        es = load_eval_set(prep_dir, name, ids, saved)
        if len(es) == 0:
            print(
                f"warning: no {name} segments (all {len(ids)} utterances were dropped)",
                file=sys.stderr,
            )
            continue
        eval_sets.append(es)
    return RunData(train, num_global, eval_sets, saved)


# --------------------------------------------------------------------------------------------
# Data order and batches
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainArrays:
    """What the training loop needs of the training segments (this process's share).

    Attributes:
      features: [N, F, T] float32 (normalised).
      labels: [N] int32.
      teacher_logits: [N, C] float32 precomputed frozen-teacher logits, or None.
    """

    features: np.ndarray
    labels: np.ndarray
    teacher_logits: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def nbytes(self) -> int:
        """Bytes of all arrays (what the on-device path puts on each device)."""
        n = self.features.nbytes + self.labels.nbytes
        return n + (0 if self.teacher_logits is None else self.teacher_logits.nbytes)


def steps_per_epoch(num_examples: int, local_batch: int) -> int:
    """ceil(num_examples / local_batch): every segment is seen once per epoch."""
    if num_examples <= 0:
        raise ValueError("no training segments")
    return -(-num_examples // local_batch)


def epoch_order(
    rng: jax.Array, epoch, num_examples: int, num_steps: int, local_batch: int, process_index=0
) -> tuple[jax.Array, jax.Array]:
    """The data order of one epoch (traceable; also called eagerly by the streaming path).

    Args:
      rng: the data key.
      epoch: epoch number (int or traced int32).
      num_examples: N, this process's training segments.
      num_steps: steps per epoch (>= ceil(N / local_batch)).
      local_batch: segments per step on this process.
      process_index: this process (its own permutation of its own share).

    Returns:
      indices [num_steps, local_batch] int32 into the N segments, and mask [num_steps,
      local_batch] bool (False on the filler copies that complete the last batch).
    """
    key = jax.random.fold_in(jax.random.fold_in(rng, epoch), process_index)
    perm = jax.random.permutation(key, num_examples).astype(jnp.int32)
    total = num_steps * local_batch
    pos = jnp.arange(total, dtype=jnp.int32)
    idx = perm[jnp.where(pos < num_examples, pos, (pos - num_examples) % num_examples)]
    mask = pos < num_examples
    return idx.reshape(num_steps, local_batch), mask.reshape(num_steps, local_batch)


_epoch_order_jit = jax.jit(epoch_order, static_argnums=(2, 3, 4, 5))


def host_epoch_order(
    rng: jax.Array, epoch: int, num_examples: int, num_steps: int, local_batch: int, process_index=0
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`epoch_order` computed once and fetched to the host (streaming path)."""
    idx, mask = _epoch_order_jit(
        rng, jnp.int32(epoch), num_examples, num_steps, local_batch, process_index
    )
    return np.asarray(idx), np.asarray(mask)


def gather_batch(
    data: TrainArrays, idx: np.ndarray, mask: np.ndarray, num_devices: int
) -> dict[str, np.ndarray]:
    """One host batch split over devices.

    Args:
      data: training arrays.
      idx: [local_batch] int indices.
      mask: [local_batch] bool.
      num_devices: local devices D (local_batch = D * per_device).

    Returns:
      dict of [D, per_device, ...] arrays.
    """
    per = idx.shape[0] // num_devices

    def shard(x):
        return x.reshape(num_devices, per, *x.shape[1:])

    batch = {
        "features": shard(data.features[idx]),
        "labels": shard(data.labels[idx]),
        "mask": shard(mask),
    }
    if data.teacher_logits is not None:
        batch["teacher_logits"] = shard(data.teacher_logits[idx])
    return batch


def iterate_batches(
    data: TrainArrays,
    order: tuple[np.ndarray, np.ndarray],
    *,
    num_devices: int,
    first_step: int = 0,
    put: Callable[[dict], Any] | None = None,
) -> Iterator[Any]:
    """Streams the batches of one epoch, preparing batch i+1 while batch i trains.

    Args:
      data: training arrays.
      order: (indices [S, B], mask [S, B]) of :func:`host_epoch_order`.
      num_devices: local devices.
      first_step: skip the first batches (resuming mid-epoch).
      put: applied to every batch before it is yielded (e.g. a device_put).

    Yields:
      ``put(batch)`` for steps first_step .. S-1.
    """
    idx, mask = order
    steps = range(first_step, idx.shape[0])
    put = put or (lambda b: b)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for s in steps:
            nxt = pool.submit(lambda s=s: put(gather_batch(data, idx[s], mask[s], num_devices)))
            if pending is not None:
                yield pending.result()
            pending = nxt
        if pending is not None:
            yield pending.result()


def device_memory_budget(device: jax.Device, fraction: float = 0.3) -> int:
    """A byte budget for resident training data: ``fraction`` of the device memory when the
    backend reports it (GPU/TPU), else 2 GiB (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory stats
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(fraction * stats["bytes_limit"])
    return 2 * 1024**3
