"""Training: teacher (cross-entropy) and student (DKD and its ablations), data parallel, resumable.

This module owns the training glue (style rule 2: the numerics live in ``losses``/``metrics``):
the train state, the optimiser and schedules, the ``jax.pmap`` train step, the on-device epoch
loop, teacher wiring, evaluation during training, logging and checkpoint cadence.

Objective (DESIGN.md §5). A teacher trains on cross-entropy. A student minimises, per segment,

    ce_weight * CE + min(epoch / warmup_epochs, 1) * D,   D = alpha*TCKD + beta*NCKD   (dkd)
                                                            kd_weight*KD                (kd)
                                                            alpha*TCKD                  (tckd)
                                                            beta*NCKD                   (nckd)
                                                            (ce: plain CE, no teacher)

with ``epoch`` counted from 1 (mdistiller), averaged over the real (unmasked) segments of the
global batch. With mixup the label-dependent terms are mixed ``lam * L(y_a) + (1 - lam) * L(y_b)``.
The weights are a runtime argument of the compiled step (:func:`loss_weights`), so the dkd, kd,
tckd and nckd students of one architecture share one compilation.

Non-finite losses. Each step checks its global loss and gradient norm; a non-finite one keeps
the previous state and records the step in ``TrainState.bad_step``, after which every step is a
no-op. The host looks at the per-step flag whenever it fetches metrics (every log interval /
epoch, never a sync per step), saves the last good state and raises
:class:`NonFiniteLossError` naming the step, epoch and batch.

Data parallelism. One ``jax.pmap`` over the local devices (``AXIS = "batch"``): a global batch
of B segments is split evenly into ``[devices, B / devices]`` (B must be divisible by the total
device count); each device's loss is its sum over real segments divided by the global count of
real segments, so ``psum`` of the gradients is exactly the gradient of the global-batch mean
(``pmean`` of per-device means would over-weight a device holding padding). BatchNorm is
synchronised (``MACNN.batch_norm_axis_name``): its batch statistics are means over all devices
(``lax.pmean``), so N devices compute what one device computes on the whole batch (up to float
summation order), and the running statistics are identical on every device. The state is
donated; the frozen teacher's variables are replicated once and never donated. Every step draws
its randomness (augmentation, dropout) from ``fold_in(fold_in(rng, step), device)``.

Padding. The last batch of an epoch is completed with copies of real segments (the start of the
epoch's permutation) with ``mask = False``: they get zero loss weight and no metric weight, and
nothing is dropped. They do enter that one step's BatchNorm batch statistics: Flax's masked
BatchNorm combined with a mapped axis averages the per-device masked means without weighting
them by their counts (wrong statistics, NaN on a device holding only filler), so no mask is
passed and the filler is real data rather than zeros.

Teacher. The teacher is restored from its workdir (``checkpointing.restore_run``), runs in eval
mode (running BatchNorm statistics) under ``stop_gradient`` and is never in the student's
checkpoint. Without augmentation its logits on the training segments never change, so they
are computed once per run (exact, DESIGN.md §5); with augmentation it runs live on the augmented
batch inside the step.

Two execution paths with the same data order (``input_pipeline.epoch_order``):

* on-device (default on GPU/TPU when the training split fits, ``train.on_device``): the split
  is replicated on every local device and an epoch is one compiled ``lax.scan`` over its steps,
  shuffling on the device;
* streaming (default on CPU): host batches gathered in a background thread, one compiled step
  per batch. XLA:CPU runs convolution weight gradients inside a compiled loop about 100x slower
  than in a standalone step (jax 0.10.2), so the on-device loop is slower there, not faster.

Both compile once per run (``TRACE_COUNTS`` counts traces; tests fail if an epoch retraces).

Multi-host (``maybe_initialize_distributed``): with a coordinator named by flags, by
``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``, or detected by
``jax.distributed.initialize`` (SLURM, TPU pods), every process reads its share of the training
shards, draws its own permutation of its share (``fold_in(epoch_key, process_index)``), and
pmap's collectives span all devices of all processes. Evaluation runs on every process over the
whole held-out set (it is small); process 0 writes the logs. Launch lines:

* SLURM, 2 nodes × 4 GPUs, one process per node (``jax.distributed.initialize()`` reads the
  SLURM environment)::

      srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=4 \\
          python train.py --distributed --data PREP --workdir RUN --role teacher

* TPU pod slice (every worker runs the same command; the TPU environment is detected)::

      gcloud compute tpus tpu-vm ssh NAME --worker=all --command \\
          "cd dkd-jax && python train.py --distributed --data PREP --workdir gs-or-nfs/RUN ..."

* explicit (any cluster)::

      python train.py --coordinator HOST0:1234 --num-processes 2 --process-id {0,1} ...

The workdir and prep dir must be on a filesystem every process sees.

Outputs of a run: ``config.json``, ``split.json``, ``normalization.json``, ``teacher.json``
(students), ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``, ``checkpoints_best/``.
Resume: rerunning the same command continues from the newest complete checkpoint and reaches
bit-identical parameters and metrics (CPU) — the data order, RNG and metric accumulators are
functions of (seed, step) and the accumulators are saved with each checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax
import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from dkd_jax import checkpointing, input_pipeline, losses, metrics, models, protocols, records
from dkd_jax import config as config_lib

__all__ = [
    "AXIS",
    "TRACE_COUNTS",
    "NonFiniteLossError",
    "TeacherMismatchError",
    "TrainState",
    "TrainingError",
    "WorkdirError",
    "create_model",
    "create_optimizer",
    "create_train_state",
    "evaluate",
    "learning_rate_schedule",
    "make_train_functions",
    "maybe_initialize_distributed",
    "predict_logits",
    "train_and_evaluate",
]

AXIS = "batch"
TRACE_COUNTS: collections.Counter = collections.Counter()
"""How often each compiled function was traced (tests assert one trace per run)."""

METRICS_FILE = "metrics.jsonl"
TEACHER_FILE = "teacher.json"
TENSORBOARD_DIR = "tensorboard"
RESUME_COMPATIBLE = frozenset(
    {
        "data.prep_dir",
        "data.eval_batch_size",
        "train.progress",
        "train.log_every_steps",
        "train.checkpoint_every_steps",
        "train.keep_checkpoints",
        "train.compilation_cache_dir",
        "train.debug_abort_after_steps",
        "train.num_devices",
    }
)
"""Config fields that may change between a run and its resumption."""


class TrainingError(RuntimeError):
    """A training problem with a one-line explanation (the CLI prints it without traceback)."""


class WorkdirError(TrainingError):
    """The workdir holds a different run (or is unusable)."""


class TeacherMismatchError(TrainingError):
    """The teacher was trained on other data than the student's training split."""


class NonFiniteLossError(TrainingError):
    """A loss or gradient became NaN/inf; the last good state was checkpointed."""

    def __init__(self, message: str, *, step: int, epoch: int, batch: int):
        super().__init__(message)
        self.step, self.epoch, self.batch = step, epoch, batch


class SimulatedAbort(TrainingError):
    """Raised by ``train.debug_abort_after_steps`` (tests of exact resume)."""


# --------------------------------------------------------------------------------------------
# Model, optimiser, state
# --------------------------------------------------------------------------------------------

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def create_model(
    arch: config_lib.ArchConfig, *, num_classes: int, batch_norm_axis_name: str | None = None
) -> models.MACNN:
    """A MACNN from an architecture config (preset + non-None overrides)."""
    overrides: dict[str, Any] = {"dtype": _DTYPES[arch.dtype]}
    for name in ("attention", "attention_heads", "attention_hidden", "init"):
        value = getattr(arch, name)
        if value is not None:
            overrides[name] = value
    if batch_norm_axis_name is not None:
        overrides["batch_norm_axis_name"] = batch_norm_axis_name
    return models.build_model(arch.preset, num_classes=num_classes, **overrides)


def learning_rate_schedule(
    optim: config_lib.OptimConfig, *, steps_per_epoch: int, total_steps: int
):
    """The learning rate as a function of the optimiser step (jnp-traceable, also on host).

    ``step_epochs`` follows the lineage exactly: after finishing 0-based epoch ``i > 0`` with
    ``i % decay_every == 0`` the rate is multiplied by ``decay_factor``, so epochs 0..10 run at
    the peak, 11..20 at 1/10 (decay_every 10). ``warmup_steps`` ramps linearly first.
    """
    lr, factor, every = optim.learning_rate, optim.decay_factor, optim.decay_every
    warm = optim.warmup_steps
    kind = optim.schedule

    def schedule(count):
        count = jnp.asarray(count, jnp.int32)
        if kind == "constant":
            value = jnp.asarray(lr, jnp.float32)
        elif kind == "step":
            k = jnp.maximum(count - warm, 0) // every
            value = lr * jnp.asarray(factor, jnp.float32) ** k.astype(jnp.float32)
        elif kind == "step_epochs":
            epoch = count // steps_per_epoch
            k = jnp.maximum(epoch - 1, 0) // every
            value = lr * jnp.asarray(factor, jnp.float32) ** k.astype(jnp.float32)
        elif kind == "cosine":
            span = max(total_steps - warm, 1)
            frac = jnp.clip((count - warm).astype(jnp.float32) / span, 0.0, 1.0)
            value = 0.5 * lr * (1.0 + jnp.cos(jnp.pi * frac))
        else:  # validated by Config
            raise ValueError(f"unknown schedule {kind!r}")
        if warm > 0:
            ramp = jnp.minimum((count + 1).astype(jnp.float32) / warm, 1.0)
            value = value * ramp
        return value.astype(jnp.float32)

    return schedule


def create_optimizer(
    optim: config_lib.OptimConfig, *, steps_per_epoch: int, total_steps: int
) -> optax.GradientTransformation:
    """Adam with coupled L2 (PyTorch ``Adam(weight_decay=...)``), not AdamW::

    chain([clip_by_global_norm], add_decayed_weights(wd), scale_by_adam, scale_by_lr(schedule))
    """
    parts = []
    if optim.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    if optim.weight_decay > 0:
        parts.append(optax.add_decayed_weights(optim.weight_decay))
    parts.append(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps))
    parts.append(
        optax.scale_by_learning_rate(
            learning_rate_schedule(optim, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        )
    )
    return optax.chain(*parts)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed).

    Attributes:
      step: int32 optimiser steps taken.
      params: model parameters.
      batch_stats: BatchNorm running statistics.
      opt_state: optimiser state.
      bad_step: int32, -1 while every loss was finite; else the step whose loss was not (the
        state is then frozen at the last good values).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    bad_step: jax.Array


def create_train_state(
    rng: jax.Array, model: models.MACNN, tx: optax.GradientTransformation, segment_shape
) -> TrainState:
    """Initial state (host numpy arrays) for inputs [batch, *segment_shape, 1].

    The model's variables come from one jitted ``model.init`` cached per (model, shape), so
    runs of one architecture (folds, ablations) share that compilation; the optimiser state is
    initialised separately.
    """
    model = model.clone(batch_norm_axis_name=None)
    variables = jax.device_get(_variables_init(model, tuple(segment_shape))(rng))
    params = variables["params"]
    opt_state = jax.device_get(jax.jit(tx.init)(params))
    return TrainState(
        step=np.zeros((), np.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=opt_state,
        bad_step=np.full((), -1, np.int32),
    )


@functools.lru_cache(maxsize=32)
def _variables_init(model, segment_shape):
    shape = (1, *segment_shape, 1)

    def init(rng):
        TRACE_COUNTS["init"] += 1
        variables = model.init(rng, jnp.zeros(shape, jnp.float32), train=False)
        return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

    return jax.jit(init)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static (hashable) part of a train step; one compilation per distinct spec.

    The loss choice is *not* static: its weights (:func:`loss_weights`) are an argument of the
    compiled step, so the dkd / kd / tckd / nckd students of one architecture share one
    compilation (the ablation grid compiles once).
    """

    steps_per_epoch: int
    teacher: str  # "none" | "precomputed" | "live"
    augment: tuple  # AugmentConfig values (dataclasses.astuple)
    num_classes: int

    @property
    def augment_config(self) -> config_lib.AugmentConfig:
        return config_lib.AugmentConfig(*self.augment)


LOSS_WEIGHT_KEYS = ("ce", "kd", "tckd", "nckd", "temperature", "warmup_epochs")


def loss_weights(loss: str, kd: config_lib.KDConfig, *, role: str = "student") -> dict:
    """The objective's weights as float32 scalars (a runtime argument of the step).

    ``total = ce * CE + min(epoch / warmup_epochs, 1) * (kd * KD + tckd * TCKD + nckd * NCKD)``
    with dkd: tckd = alpha, nckd = beta; kd: kd = kd_weight; tckd: alpha; nckd: beta; ce (and
    every teacher): plain CE.
    """
    w = dict.fromkeys(("ce", "kd", "tckd", "nckd"), 0.0)
    if role == "teacher" or loss == "ce":
        w["ce"] = 1.0
    else:
        w["ce"] = kd.ce_weight
        if loss == "dkd":
            w["tckd"], w["nckd"] = kd.alpha, kd.beta
        elif loss == "kd":
            w["kd"] = kd.kd_weight
        elif loss == "tckd":
            w["tckd"] = kd.alpha
        elif loss == "nckd":
            w["nckd"] = kd.beta
        else:
            raise ValueError(f"unknown loss {loss!r}")
    w["temperature"] = kd.temperature
    w["warmup_epochs"] = kd.warmup_epochs if role == "student" else 0.0
    return {k: np.float32(v) for k, v in w.items()}


def augment_batch(x, labels, rng, aug: config_lib.AugmentConfig):
    """On-the-fly augmentation of one device batch.

    Args:
      x: [P, F, T, 1] features.
      labels: [P] int labels.
      rng: key.
      aug: the augmentation settings.

    Returns:
      (x [P, F, T, 1], partner labels [P] (mixup; else ``labels``), lam [P] float32 weight of
      the own label (1 without mixup)).
    """
    p, f, t = x.shape[0], x.shape[1], x.shape[2]
    k_shift, k_freq, k_time, k_mix, k_perm = jax.random.split(rng, 5)
    if aug.time_shift_frames > 0:
        s = aug.time_shift_frames
        shifts = jax.random.randint(k_shift, (p,), -s, s + 1)
        x = jax.vmap(lambda xi, si: jnp.roll(xi, si, axis=1))(x, shifts)

    def masks(key, count, width, size):
        kw, ks = jax.random.split(key)
        w = jax.random.randint(kw, (p, count), 0, min(width, size) + 1)
        start = jax.random.randint(ks, (p, count), 0, size + 1 - w)  # per-mask upper bound
        pos = jnp.arange(size)
        hit = (pos[None, None, :] >= start[..., None]) & (
            pos[None, None, :] < (start + w)[..., None]
        )
        return jnp.any(hit, axis=1)  # [P, size]

    if aug.freq_masks > 0 or aug.time_masks > 0:
        fill = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
        cut = jnp.zeros((p, f, t), bool)
        if aug.freq_masks > 0:
            cut = cut | masks(k_freq, aug.freq_masks, aug.freq_mask_width, f)[:, :, None]
        if aug.time_masks > 0:
            cut = cut | masks(k_time, aug.time_masks, aug.time_mask_width, t)[:, None, :]
        x = jnp.where(cut[..., None], fill, x)
    labels_b = labels
    lam = jnp.ones((p,), jnp.float32)
    if aug.mixup_alpha > 0:
        lam = jax.random.beta(k_mix, aug.mixup_alpha, aug.mixup_alpha, (p,)).astype(jnp.float32)
        partner = jax.random.permutation(k_perm, p)
        x = lam[:, None, None, None] * x + (1.0 - lam[:, None, None, None]) * x[partner]
        labels_b = labels[partner]
    return x, labels_b, lam


def loss_terms(logits, teacher_logits, labels, labels_b, lam, *, temperature) -> dict:
    """Per-example loss terms (all [P] float32, via ``dkd_jax.losses``).

    Args:
      logits: [P, C] student logits.
      teacher_logits: [P, C] frozen teacher logits, or None.
      labels: [P] int labels; labels_b: [P] mixup partner labels (``labels`` without mixup).
      lam: [P] mixup weight of ``labels``.
      temperature: distillation temperature (scalar, may be traced).

    Returns:
      {"ce"} plus, with a teacher, {"kd", "tckd", "nckd"}; label-dependent terms are mixed
      ``lam * L(labels) + (1 - lam) * L(labels_b)``.
    """

    def mixed(fn):
        a = fn(labels)
        if labels_b is labels:
            return a
        return lam * a + (1.0 - lam) * fn(labels_b)

    t = temperature
    terms = {"ce": mixed(lambda y: losses.cross_entropy(logits, y))}
    if teacher_logits is not None:
        terms["tckd"] = mixed(lambda y: losses.tckd_loss(logits, teacher_logits, y, temperature=t))
        terms["nckd"] = mixed(lambda y: losses.nckd_loss(logits, teacher_logits, y, temperature=t))
        terms["kd"] = losses.kd_loss(logits, teacher_logits, temperature=t)
    return terms


def objective(terms: dict, weights: dict, ramp) -> jax.Array:
    """ce * CE + ramp * (kd * KD + tckd * TCKD + nckd * NCKD), per example [P]."""
    total = weights["ce"] * terms["ce"]
    if "kd" in terms:
        distill = (
            weights["kd"] * terms["kd"]
            + weights["tckd"] * terms["tckd"]
            + weights["nckd"] * terms["nckd"]
        )
        total = total + ramp * distill
    return total


def kd_ramp(step, warmup_epochs, steps_per_epoch: int):
    """min(epoch / warmup_epochs, 1) with the 1-based epoch of ``step``; 1 when warmup is 0."""
    epoch = (jnp.asarray(step) // steps_per_epoch + 1).astype(jnp.float32)
    warm = jnp.asarray(warmup_epochs, jnp.float32)
    return jnp.where(warm > 0, jnp.minimum(epoch / jnp.maximum(warm, 1e-12), 1.0), 1.0)


METRIC_KEYS = ("count", "loss", "ce", "kd", "tckd", "nckd", "grad_norm", "nonfinite")


def _zero_metrics(num_classes: int) -> dict:
    out = {k: jnp.zeros((), jnp.float32) for k in METRIC_KEYS}
    out["confusion"] = jnp.zeros((num_classes, num_classes), jnp.float32)
    return out


def train_step(
    state, batch, teacher_vars, weights, rng, *, model, teacher_model, tx, spec: StepSpec
):
    """One optimiser step on one device's share of the global batch (call under pmap).

    Args:
      state: TrainState (this device's replica).
      batch: features [P, F, T], labels [P], mask [P] bool (+ teacher_logits [P, C]).
      teacher_vars: frozen teacher variables (live teacher) or None.
      weights: :func:`loss_weights` (float32 scalars).
      rng: the run's step key (folded with the step and the device index here).
      model: the trained MACNN (BatchNorm synchronised over AXIS).
      teacher_model: the frozen teacher (live teacher) or None.
      tx: optimiser.
      spec: static step description.

    Returns:
      (new state, metrics): metric sums over the global batch (identical on every device):
      count, loss, ce, kd, tckd, nckd (sums over real segments), grad_norm, nonfinite (0/1),
      confusion [C, C] (segment level).
    """
    TRACE_COUNTS["train_step"] += 1
    mask = batch["mask"]
    maskf = mask.astype(jnp.float32)
    labels = batch["labels"]
    count = lax.psum(jnp.sum(maskf), AXIS)
    key = jax.random.fold_in(jax.random.fold_in(rng, state.step), lax.axis_index(AXIS))
    aug_key, dropout_key = jax.random.split(key)
    x = batch["features"][..., None]
    labels_b, lam = labels, jnp.ones_like(maskf)
    aug = spec.augment_config
    if aug.enabled:
        x, labels_b, lam = augment_batch(x, labels, aug_key, aug)
    teacher_logits = None
    if spec.teacher == "precomputed":
        teacher_logits = batch["teacher_logits"]
    elif spec.teacher == "live":
        teacher_logits = teacher_model.apply(teacher_vars, x, train=False)
    if teacher_logits is not None:
        teacher_logits = lax.stop_gradient(teacher_logits.astype(jnp.float32))
    ramp = kd_ramp(state.step, weights["warmup_epochs"], spec.steps_per_epoch)

    def loss_fn(params):
        logits, mutated = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_key},
        )
        terms = loss_terms(
            logits, teacher_logits, labels, labels_b, lam, temperature=weights["temperature"]
        )
        total = jnp.where(mask, objective(terms, weights, ramp), 0.0)
        return jnp.sum(total) / count, (logits, mutated["batch_stats"], terms, total)

    (_, (logits, new_stats, terms, total)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    grads = lax.psum(grads, AXIS)
    new_stats = lax.pmean(new_stats, AXIS)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    loss_sum = lax.psum(jnp.sum(total), AXIS)
    ok = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)

    out = _zero_metrics(spec.num_classes)
    out.update(count=count, loss=loss_sum, grad_norm=grad_norm, nonfinite=(~ok).astype(jnp.float32))
    for name in ("ce", "kd", "tckd", "nckd"):
        if name in terms:
            out[name] = lax.psum(jnp.sum(jnp.where(mask, terms[name], 0.0)), AXIS)
    pred = jnp.argmax(logits, axis=-1)
    onehot_true = jax.nn.one_hot(labels, spec.num_classes) * maskf[:, None]
    onehot_pred = jax.nn.one_hot(pred, spec.num_classes)
    out["confusion"] = lax.psum(onehot_true.T @ onehot_pred, AXIS)

    updated = TrainState(
        step=state.step + 1,
        params=new_params,
        batch_stats=new_stats,
        opt_state=new_opt,
        bad_step=state.bad_step,
    )
    failed = state.replace(bad_step=state.step)
    new_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), updated, failed)
    return new_state, out


def _guarded_step(state, batch, teacher_vars, weights, rng, active, *, step_fn, num_classes):
    """Runs ``step_fn`` and keeps its result only when ``active`` and the state is healthy
    (no earlier non-finite loss); otherwise the state is unchanged and the metrics are zero.

    A select rather than ``lax.cond``: on XLA:CPU a step inside a conditional ran 10x slower
    (measured: 0.98 s vs 0.09 s per batch-32 student step), and skipped steps only happen when
    resuming mid-epoch on the on-device path or after a non-finite loss.
    """
    del num_classes
    go = jnp.logical_and(active, state.bad_step < 0)
    new_state, metrics = step_fn(state, batch, teacher_vars, weights, rng)
    new_state = jax.tree.map(lambda a, b: jnp.where(go, a, b), new_state, state)
    metrics = jax.tree.map(lambda v: jnp.where(go, v, jnp.zeros_like(v)), metrics)
    return new_state, metrics


def train_epoch(
    state,
    data,
    device_index,
    teacher_vars,
    weights,
    rngs,
    epoch,
    first_step,
    *,
    step_fn,
    num_classes: int,
    num_steps: int,
    local_batch: int,
    per_device: int,
    process_index: int,
):
    """One epoch as one compiled loop over its steps (call under pmap).

    Args:
      state: TrainState replica.
      data: this process's training split on this device: features [N, F, T], labels [N]
        (+ teacher_logits [N, C]).
      device_index: this device's index among the local devices (selects its batch slice).
      teacher_vars: frozen teacher (live) or None.
      weights: :func:`loss_weights`.
      rngs: (data key, step key).
      epoch: int32 epoch number.
      first_step: steps before this index are skipped (resuming mid-epoch).

    Returns:
      (state, per-step metrics stacked over [num_steps]).
    """
    TRACE_COUNTS["train_epoch"] += 1
    data_key, step_key = rngs
    n = data["labels"].shape[0]
    idx, mask = input_pipeline.epoch_order(
        data_key, epoch, n, num_steps, local_batch, process_index
    )

    def body(state, i):
        rows = lax.dynamic_slice_in_dim(idx[i], device_index * per_device, per_device)
        batch = {k: v[rows] for k, v in data.items()}
        batch["mask"] = lax.dynamic_slice_in_dim(mask[i], device_index * per_device, per_device)
        return _guarded_step(
            state,
            batch,
            teacher_vars,
            weights,
            step_key,
            i >= first_step,
            step_fn=step_fn,
            num_classes=num_classes,
        )

    return lax.scan(body, state, jnp.arange(num_steps))


class TrainFunctions(NamedTuple):
    """The compiled functions of a run (see :func:`make_train_functions`)."""

    tx: optax.GradientTransformation
    # (state[D], batch[D], teacher_vars[D] | None, weights, step_key) -> (state, metrics)
    p_step: Any
    # (num_steps, local_batch, per_device, process_index) -> pmapped :func:`train_epoch`
    p_epoch: Any


def make_train_functions(
    model,
    teacher_model,
    optim: config_lib.OptimConfig,
    spec: StepSpec,
    devices: Sequence,
    *,
    total_steps: int,
    segment_shape: Sequence[int],
) -> TrainFunctions:
    """The optimiser and the pmapped step and epoch functions of a run.

    Cached on all arguments, so identical runs in one process (tests, cross-validation folds
    of one shape) share compiled code.

    Args:
      model: the trained MACNN with ``batch_norm_axis_name=AXIS``.
      teacher_model: the frozen teacher when it runs live in the step, else None.
      optim: optimiser settings.
      spec: static step description.
      devices: the local devices of the pmap.
      total_steps: steps of the whole run (cosine schedule).
      segment_shape: (F, T) of one segment.
    """
    # Only the cosine schedule depends on the run length: other runs of any length share code.
    total = int(total_steps) if optim.schedule == "cosine" else 0
    return _compiled(
        model,
        teacher_model,
        dataclasses.astuple(optim),
        spec,
        tuple(devices),
        total,
        tuple(segment_shape),
    )


@functools.lru_cache(maxsize=16)
def _compiled(model, teacher_model, optim_key, spec: StepSpec, devices, total_steps, segment_shape):
    optim = config_lib.OptimConfig(*optim_key)
    tx = create_optimizer(optim, steps_per_epoch=spec.steps_per_epoch, total_steps=total_steps)
    step_fn = functools.partial(
        train_step, model=model, teacher_model=teacher_model, tx=tx, spec=spec
    )

    def one_step(state, batch, teacher_vars, weights, rng):
        TRACE_COUNTS["step_fn"] += 1
        return _guarded_step(
            state,
            batch,
            teacher_vars,
            weights,
            rng,
            True,
            step_fn=step_fn,
            num_classes=spec.num_classes,
        )

    p_step = jax.pmap(
        one_step,
        axis_name=AXIS,
        in_axes=(0, 0, 0, None, None),
        donate_argnums=(0,),
        devices=devices,
    )

    @functools.lru_cache(maxsize=4)
    def p_epoch(num_steps, local_batch, per_device, process_index):
        fn = functools.partial(
            train_epoch,
            step_fn=step_fn,
            num_classes=spec.num_classes,
            num_steps=num_steps,
            local_batch=local_batch,
            per_device=per_device,
            process_index=process_index,
        )
        return jax.pmap(
            fn,
            axis_name=AXIS,
            in_axes=(0, 0, 0, 0, None, None, None, None),
            donate_argnums=(0,),
            devices=devices,
        )

    return TrainFunctions(tx, p_step, p_epoch)


def clear_caches() -> None:
    """Forgets compiled functions and trace counts (tests)."""
    _compiled.cache_clear()
    _predict_fn.cache_clear()
    _variables_init.cache_clear()
    TRACE_COUNTS.clear()


# --------------------------------------------------------------------------------------------
# Prediction and evaluation
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _predict_fn(model, devices):
    def predict(variables, x):
        TRACE_COUNTS["predict"] += 1
        return model.apply(variables, x[..., None], train=False).astype(jnp.float32)

    return jax.pmap(predict, axis_name=AXIS, in_axes=(0, 0), devices=devices)


def _local_devices(num_devices: int = 0) -> tuple:
    devs = jax.local_devices()
    if num_devices:
        if num_devices > len(devs):
            raise TrainingError(
                f"train.num_devices={num_devices} but only {len(devs)} local device(s): {devs}"
            )
        devs = devs[:num_devices]
    return tuple(devs)


EVAL_MIN_BUCKET = 8
"""Smallest per-device batch of a padded last prediction batch (see :func:`predict_logits`)."""


def _tail_rows(needed: int, per: int) -> int:
    """Per-device rows of a batch that must hold ``needed`` rows: ``per`` when it is full, else
    the next power of two >= needed (at least EVAL_MIN_BUCKET), so that a short last batch
    costs about its size and only log2(per) extra shapes can ever compile."""
    if needed >= per:
        return per
    bucket = EVAL_MIN_BUCKET
    while bucket < needed:
        bucket *= 2
    return min(bucket, per)


def predict_logits(
    model, variables, features: np.ndarray, *, batch_size: int, devices: Sequence | None = None
) -> np.ndarray:
    """Segment logits of a model in eval mode (running BatchNorm statistics).

    One compiled function per (model, per-device batch, segment shape), pmapped over the local
    devices. Full batches have ``batch_size`` rows; the last one is zero-padded only up to the
    next power-of-two per-device size (>= ``EVAL_MIN_BUCKET``), so a small eval set does not pay
    for a whole ``batch_size`` batch (on a 2-core CPU, padding 81 EmoDB segments to 256 made the
    per-epoch evaluation cost as much as the epoch's training), and at most
    ``log2(batch_size / d / EVAL_MIN_BUCKET) + 2`` shapes compile per model. Padding rows are
    discarded (eval-mode BatchNorm is per example, so padding cannot change real rows).

    Args:
      model: a MACNN.
      variables: {"params", "batch_stats"} (host or device arrays, not replicated).
      features: [N, F, T] float32 segments (already normalised like the training data).
      batch_size: segments per call over all local devices (rounded up to a multiple of them).
      devices: devices to use (default all local devices).

    Returns:
      [N, num_classes] float32 numpy logits.
    """
    features = np.asarray(features, np.float32)
    if features.ndim != 3:
        raise ValueError(f"predict_logits: features must be [N, F, T], got {features.shape}")
    devices = tuple(devices) if devices is not None else _local_devices()
    d = len(devices)
    per = max(1, -(-int(batch_size) // d))
    n = features.shape[0]
    num_classes = model.num_classes
    if n == 0:
        return np.zeros((0, num_classes), np.float32)
    fn = _predict_fn(model, devices)
    rep = replicate(
        {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})},
        devices=devices,
    )
    out = []
    start = 0
    while start < n:
        rows = _tail_rows(-(-(n - start) // d), per)
        step = rows * d
        chunk = features[start : start + step]
        if chunk.shape[0] < step:
            pad = np.zeros((step - chunk.shape[0], *chunk.shape[1:]), np.float32)
            chunk = np.concatenate([chunk, pad])
        logits = fn(rep, chunk.reshape(d, rows, *chunk.shape[1:]))
        out.append(np.asarray(logits).reshape(step, num_classes)[: n - start])
        start += step
    return np.concatenate(out)


@dataclasses.dataclass
class EvalSet:
    """Held-out segments, ready for utterance-level scoring.

    Attributes:
      name: "test" or "validation".
      features: [N, F, T] float32 normalised eval-layout segments.
      utterance_index: [N] int index into ``utterance_ids``.
      utterance_ids: [U] str.
      utterance_labels: [U] int.
      num_unscored: utterances of the split with no segment (dropped short utterances).
    """

    name: str
    features: np.ndarray
    utterance_index: np.ndarray
    utterance_ids: np.ndarray
    utterance_labels: np.ndarray
    num_unscored: int = 0

    @classmethod
    def from_arrays(cls, name: str, arrays: records.SegmentArrays, expected_ids) -> EvalSet:
        ids, index = np.unique(arrays.utterance_ids, return_inverse=True)
        labels = np.zeros((len(ids),), np.int32)
        labels[index] = arrays.labels
        missing = len(set(expected_ids) - set(ids.tolist()))
        return cls(name, arrays.features, index.astype(np.int32), ids, labels, missing)

    def __len__(self) -> int:
        return int(self.utterance_ids.shape[0])


def evaluate(
    model, variables, eval_set: EvalSet, *, batch_size: int, devices=None
) -> dict[str, Any]:
    """Utterance-level WA/UA: mean segment logits per utterance, argmax, confusion matrix.

    Returns:
      dict: wa, ua, confusion_matrix (list of lists), num_utterances, num_segments,
      num_unscored.
    """
    logits = predict_logits(
        model, variables, eval_set.features, batch_size=batch_size, devices=devices
    )
    utt = metrics.aggregate_utterances(logits, eval_set.utterance_index, len(eval_set))
    pred = np.argmax(utt, axis=1)
    cm = metrics.confusion_matrix(eval_set.utterance_labels, pred, num_classes=model.num_classes)
    return {
        "wa": metrics.weighted_accuracy(cm),
        "ua": metrics.unweighted_accuracy(cm),
        "confusion_matrix": cm.tolist(),
        "num_utterances": len(eval_set),
        "num_segments": int(eval_set.features.shape[0]),
        "num_unscored": int(eval_set.num_unscored),
    }


# --------------------------------------------------------------------------------------------
# Multi-host
# --------------------------------------------------------------------------------------------


def maybe_initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Calls ``jax.distributed.initialize`` when a multi-process run is requested.

    Requested by: explicit arguments; the environment ``JAX_COORDINATOR_ADDRESS`` (with
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``); ``auto=True`` (``--distributed``: let JAX detect
    SLURM, Open MPI or a TPU pod); or a SLURM job step with more than one task. CPU processes use
    the gloo collectives. Must run before anything touches a JAX device.

    Returns:
      True when initialised.
    """
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    slurm = int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_ID" in env
    if not (coordinator or auto or slurm):
        return False
    if not env.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator:
        kwargs["coordinator_address"] = coordinator
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise TrainingError(
            f"jax.distributed.initialize({kwargs or ''}) failed: {str(e).splitlines()[0][:300]}; "
            "name the coordinator with --coordinator HOST:PORT --num-processes N --process-id I"
        ) from e
    return True


def _sum_over_processes(value: int) -> int:
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def _max_over_processes(value: int) -> int:
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


# --------------------------------------------------------------------------------------------
# Host-side bookkeeping: metric sums, logging
# --------------------------------------------------------------------------------------------


class MetricSums:
    """Float64 running sums of per-step metrics (checkpointed, so a resumed run continues the
    same sums bit for bit)."""

    def __init__(self, num_classes: int, data: dict | None = None):
        self.num_classes = num_classes
        self.sums = {k: 0.0 for k in METRIC_KEYS}
        self.confusion = np.zeros((num_classes, num_classes), np.float64)
        self.steps = 0
        if data:
            self.sums.update({k: float(v) for k, v in data["sums"].items()})
            self.confusion = np.asarray(data["confusion"], np.float64)
            self.steps = int(data["steps"])

    def add(self, m: dict) -> None:
        for k in METRIC_KEYS:
            self.sums[k] += float(m[k])
        self.confusion += np.asarray(m["confusion"], np.float64)
        self.steps += 1

    def means(self) -> dict[str, float]:
        c = max(self.sums["count"], 1.0)
        out = {k: self.sums[k] / c for k in ("loss", "ce", "kd", "tckd", "nckd")}
        out["grad_norm"] = self.sums["grad_norm"] / max(self.steps, 1)
        cm = self.confusion.astype(np.int64)
        if cm.sum() > 0:
            out["wa"] = metrics.weighted_accuracy(cm)
            out["ua"] = metrics.unweighted_accuracy(cm)
        return out

    def to_json(self) -> dict:
        return {"sums": dict(self.sums), "confusion": self.confusion.tolist(), "steps": self.steps}


class RunLogger:
    """metrics.jsonl (+ TensorBoard) on process 0; a no-op elsewhere."""

    def __init__(self, workdir: Path, *, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.path = workdir / METRICS_FILE
        self._tb = None
        if not enabled:
            return
        kept = []
        if self.path.exists() and resume_step > 0:
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", 0) <= resume_step and rec.get("event") != "final":
                    kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / TENSORBOARD_DIR))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self._tb = None

    def log(self, record: dict, scalars: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None and scalars:
            for k, v in scalars.items():
                if v is not None and math.isfinite(v):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        dynamic_ncols=True,
        disable=not (enabled and sys.stderr.isatty() and jax.process_index() == 0),
    )


# --------------------------------------------------------------------------------------------
# Workdir handling
# --------------------------------------------------------------------------------------------

_RUN_FILES = (
    "config.json",
    protocols.SPLIT_FILE,
    checkpointing.NORMALIZATION_FILE,
    TEACHER_FILE,
    METRICS_FILE,
)
_RUN_DIRS = (checkpointing.CHECKPOINT_DIR, checkpointing.BEST_DIR, TENSORBOARD_DIR)


def _prepare_workdir(workdir: Path, cfg: config_lib.Config, *, overwrite: bool) -> bool:
    """Creates the workdir or checks it for resumption; returns True when resuming."""
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"{workdir}: exists and is not a directory")
    cfg_path = workdir / "config.json"
    if overwrite and jax.process_index() == 0:
        for name in _RUN_FILES:
            (workdir / name).unlink(missing_ok=True)
        for name in _RUN_DIRS:
            shutil.rmtree(workdir / name, ignore_errors=True)
    if not overwrite and cfg_path.exists():
        try:
            old = config_lib.loads(cfg_path.read_text(), source=str(cfg_path))
        except config_lib.ConfigError as e:
            raise WorkdirError(f"{e}; use --overwrite to start a new run there") from None
        changed = {k: v for k, v in config_lib.diff(old, cfg).items() if k not in RESUME_COMPATIBLE}
        if changed:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
            raise WorkdirError(
                f"{workdir} holds a run with a different config ({shown}); use another "
                "--workdir, or --overwrite to replace it"
            )
        return True
    if not overwrite and (workdir / checkpointing.CHECKPOINT_DIR).exists():
        raise WorkdirError(
            f"{workdir} has checkpoints but no config.json; use --overwrite to replace them"
        )
    return False


def _data_info(meta: dict, normalization: str) -> dict[str, Any]:
    return {
        "content_hash": meta.get("content_hash"),
        "feature_config": meta.get("feature_config"),
        "label_names": list(meta.get("label_names", [])),
        "segment_shape": list(meta.get("segment_shape", [])),
        "corpus": meta.get("corpus"),
        "normalization": normalization,
    }


def _check_teacher(teacher_dir: Path, teacher_split, teacher_info, split, info) -> None:
    """Refuses a teacher trained on other data (features, labels, prep, split)."""
    for key, what in (
        ("feature_config", "feature config"),
        ("label_names", "label map"),
        ("content_hash", "prep content hash (another prep of the data)"),
        ("normalization", "feature normalisation"),
    ):
        if teacher_info.get(key) != info.get(key):
            raise TeacherMismatchError(
                f"teacher {teacher_dir} was trained with a different {what}: "
                f"{teacher_info.get(key)!r} vs the student's {info.get(key)!r}"
            )
    t_train, s_train = set(teacher_split.train_ids), set(split.train_ids)
    if t_train != s_train:
        leak = t_train & (set(split.test_ids) | set(split.validation_ids))
        extra, missing = len(t_train - s_train), len(s_train - t_train)
        detail = (
            f"{len(leak)} of the student's held-out (test/validation) utterances are in the "
            "teacher's training data (test leak)"
            if leak
            else f"{extra} extra and {missing} missing utterance(s)"
        )
        raise TeacherMismatchError(
            f"teacher {teacher_dir} was trained on a different split ({teacher_split.name}) than "
            f"the student's training split ({split.name}): {detail}; train the teacher with the "
            "same data.protocol/fold/split_seed/validation settings"
        )


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------


def replicate(tree, devices):
    """Copies of a host pytree on every device, stacked on a leading [devices] axis with the
    same sharding pmap gives its outputs (so the first call does not trace differently)."""
    sharding = jax.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.P(AXIS))
    n = len(devices)

    def put(x):
        x = np.asarray(x)
        return jax.device_put(np.broadcast_to(x[None], (n, *x.shape)), sharding)

    return jax.tree.map(put, tree)


def _unreplicate(tree):
    """Device 0's copy of a replicated pytree, as host numpy (no compiled slicing)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)


def _oom_hint(e: Exception) -> TrainingError | None:
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text:
        return TrainingError(
            "out of device memory: lower optim.batch_size or data.eval_batch_size, set "
            "train.on_device=off (stream batches instead of holding the split on the device), "
            "or free the device (XLA_PYTHON_CLIENT_MEM_FRACTION / XLA_PYTHON_CLIENT_PREALLOCATE="
            f"false). Original error: {text.splitlines()[0][:300]}"
        )
    return None


def train_and_evaluate(
    config: config_lib.Config,
    workdir: str | os.PathLike,
    *,
    teacher_workdir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Trains one model (teacher or student) and evaluates it on the held-out utterances.

    Args:
      config: resolved config (``config.data.prep_dir`` names the data; ``config.model.role``
        which network trains; ``config.kd.loss`` the student objective).
      workdir: output directory (created; an existing run with the same config is resumed).
      teacher_workdir: the teacher's workdir (students with a distillation loss).
      overwrite: replace a run with a different config in ``workdir``.

    Returns:
      Final metrics: {"step", "epoch", "test": {wa, ua, ...} or None, "validation": ... or None,
      "best_validation": {"ua", "step"} or None, "train": {loss, wa, ua, ...}, "workdir",
      "on_device", "num_devices", "process_count"}.

    Raises:
      records.DataError: missing/empty/corrupt prep dir.
      WorkdirError, TeacherMismatchError, NonFiniteLossError, TrainingError: see their docs.
    """
    try:
        return _train_and_evaluate(config, workdir, teacher_workdir, overwrite)
    except jax.errors.JaxRuntimeError as e:  # pragma: no cover - device dependent
        hint = _oom_hint(e)
        if hint is not None:
            raise hint from e
        raise


def _train_and_evaluate(config, workdir, teacher_workdir, overwrite) -> dict[str, Any]:
    cfg = config_lib.from_dict(config_lib.to_dict(config))  # validated private copy
    if cfg.train.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cfg.train.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    workdir = Path(workdir)
    primary = jax.process_index() == 0
    pidx, pcount = jax.process_index(), jax.process_count()

    # ---- data and split -------------------------------------------------------------------
    prep_dir = cfg.data.prep_dir
    meta = input_pipeline.load_metadata(prep_dir)
    label_names = list(meta.get("label_names", []))
    num_classes = len(label_names)
    if num_classes < 2:
        raise records.DataError(f"{prep_dir}: metadata.json has {num_classes} label names")
    split = protocols.make_split(
        meta, protocol=cfg.data.protocol, fold=cfg.data.fold, seed=cfg.data.split_seed
    )
    split = protocols.hold_out_validation(
        split,
        meta,
        mode=cfg.data.validation,
        fraction=cfg.data.validation_fraction,
        seed=cfg.data.split_seed,
    )
    protocols.check_disjoint(split)
    info = _data_info(meta, cfg.data.normalization)
    role = cfg.model.role
    loss = "ce" if role == "teacher" else cfg.kd.loss

    resuming = _prepare_workdir(workdir, cfg, overwrite=overwrite)
    if resuming:
        old_split, old_info = protocols.load_split_file(workdir / protocols.SPLIT_FILE)
        if old_split != split or old_info.get("content_hash") != info["content_hash"]:
            raise WorkdirError(
                f"{workdir}: the data or split changed since this run started (content hash "
                f"{old_info.get('content_hash')} -> {info['content_hash']}); use --overwrite"
            )

    # ---- teacher --------------------------------------------------------------------------
    teacher = None
    if role == "student" and loss != "ce":
        if teacher_workdir is None:
            raise TrainingError(f"kd.loss={loss!r} needs a teacher: pass --teacher TEACHER_WORKDIR")
        tdir = Path(teacher_workdir)
        try:
            t_split, t_info = protocols.load_split_file(tdir / protocols.SPLIT_FILE)
            teacher = checkpointing.restore_run(tdir)
        except ValueError as e:
            raise TeacherMismatchError(f"cannot use teacher {tdir}: {e}") from None
        _check_teacher(tdir, t_split, t_info, split, info)
        if teacher.config.model.role != "teacher":
            print(
                f"note: {tdir} trained a {teacher.config.model.role}; using it as the teacher",
                file=sys.stderr,
            )

    # ---- arrays ---------------------------------------------------------------------------
    train_arrays = input_pipeline.load_segments(
        prep_dir, "train", split.train_ids, process_index=pidx, process_count=pcount
    )
    num_global = _sum_over_processes(len(train_arrays))
    if num_global == 0:
        raise records.DataError(f"{prep_dir}: no training segments for split {split.name}")
    norm_mode = cfg.data.normalization
    groups = None
    if norm_mode == "speaker":
        groups = sorted({str(u["speaker"]) for u in meta["utterances"]})
    elif norm_mode == "utterance":
        groups = sorted(split.train_ids)
    normalization = input_pipeline.fit_normalization(train_arrays, norm_mode, group_names=groups)
    train_arrays = input_pipeline.normalize_arrays(train_arrays, normalization)
    # Stored with the run: "global" statistics; the training speakers' statistics ("speaker",
    # so a held-out utterance of a training speaker is normalised like its training data).
    # Utterances normalise themselves; unseen speakers use their own segments.
    saved_norm = {k: v for k, v in normalization.items() if k != "groups" or norm_mode == "speaker"}
    eval_sets = []
    for name, ids in (("test", split.test_ids), ("validation", split.validation_ids)):
        if ids:
            arr = input_pipeline.load_segments(prep_dir, "eval", ids)
            if len(arr) == 0:
                print(
                    f"warning: no {name} segments (all {len(ids)} utterances were dropped)",
                    file=sys.stderr,
                )
                continue
            arr = input_pipeline.normalize_arrays(arr, saved_norm)
            eval_sets.append(EvalSet.from_arrays(name, arr, ids))

    # ---- devices and batch ----------------------------------------------------------------
    devices = _local_devices(cfg.train.num_devices)
    num_local = len(devices)
    total_devices = num_local * pcount
    if cfg.optim.batch_size % total_devices:
        raise TrainingError(
            f"optim.batch_size={cfg.optim.batch_size} is not divisible by the {total_devices} "
            f"device(s); use a multiple of {total_devices}"
        )
    per_device = cfg.optim.batch_size // total_devices
    local_batch = per_device * num_local
    spe = input_pipeline.steps_per_epoch(_max_over_processes(len(train_arrays)), local_batch)
    total_steps = spe * cfg.optim.num_epochs

    # ---- teacher logits (precomputed when exact) ------------------------------------------
    aug_on = cfg.augment.enabled
    teacher_mode = "none" if teacher is None else ("live" if aug_on else "precomputed")
    teacher_logits = None
    if teacher_mode == "precomputed":
        teacher_logits = predict_logits(
            teacher.model,
            teacher.variables,
            train_arrays.features,
            batch_size=cfg.data.eval_batch_size,
            devices=devices,
        )
        if not np.all(np.isfinite(teacher_logits)):
            raise TeacherMismatchError(f"teacher {teacher_workdir} gives non-finite logits")
    data = input_pipeline.TrainArrays(
        train_arrays.features, train_arrays.labels.astype(np.int32), teacher_logits
    )

    if cfg.train.on_device == "auto":
        # Not on XLA:CPU: there the weight-gradient convolutions inside a while loop (the
        # scanned epoch) run ~100x slower than in a standalone step (measured with jax 0.10.2:
        # a 3x3 conv kernel gradient 6.7 s vs 0.066 s; a whole student step 0.93 s vs 0.09 s),
        # and host memory is the device memory anyway, so streaming costs no transfer.
        budget = cfg.train.on_device_max_bytes or input_pipeline.device_memory_budget(devices[0])
        on_device = devices[0].platform != "cpu" and data.nbytes() <= budget
    else:
        on_device = cfg.train.on_device == "on"

    # ---- model, optimiser, compiled functions ---------------------------------------------
    arch = getattr(cfg.model, role)
    model = create_model(arch, num_classes=num_classes, batch_norm_axis_name=AXIS)
    eval_model = create_model(arch, num_classes=num_classes)
    spec = StepSpec(
        steps_per_epoch=spe,
        teacher=teacher_mode,
        augment=dataclasses.astuple(cfg.augment),
        num_classes=num_classes,
    )
    weights = loss_weights(loss, cfg.kd, role=role)
    teacher_model = teacher.model if teacher_mode == "live" else None
    segment_shape = tuple(train_arrays.features.shape[1:])
    tx, p_step, p_epoch = make_train_functions(
        model,
        teacher_model,
        cfg.optim,
        spec,
        devices,
        total_steps=total_steps,
        segment_shape=segment_shape,
    )
    schedule = learning_rate_schedule(cfg.optim, steps_per_epoch=spe, total_steps=total_steps)

    root = jax.random.PRNGKey(cfg.train.seed)
    init_key, data_key, step_key = (jax.random.fold_in(root, i) for i in range(3))
    state = create_train_state(init_key, eval_model, tx, segment_shape)

    # ---- resume ---------------------------------------------------------------------------
    ckpt = checkpointing.Checkpointer(
        workdir / checkpointing.CHECKPOINT_DIR, max_to_keep=cfg.train.keep_checkpoints
    )
    best_ckpt = None
    if any(s.name == "validation" for s in eval_sets):
        best_ckpt = checkpointing.Checkpointer(workdir / checkpointing.BEST_DIR, max_to_keep=1)
    start_step = 0
    best = {"ua": None, "step": None}
    interval = MetricSums(num_classes)
    epoch_sums = MetricSums(num_classes)
    last_train: dict = {}
    latest = ckpt.latest_step() if resuming else None
    if latest is not None:
        state, ck_meta = ckpt.restore(latest, target=state)
        start_step = int(state.step)
        best = ck_meta.get("best", best)
        interval = MetricSums(num_classes, ck_meta.get("interval"))
        epoch_sums = MetricSums(num_classes, ck_meta.get("epoch_sums"))
        last_train = ck_meta.get("last_train", {})

    # ---- files ----------------------------------------------------------------------------
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config_lib.dumps(cfg))
        protocols.save_split(workdir / protocols.SPLIT_FILE, split, info)
        (workdir / checkpointing.NORMALIZATION_FILE).write_text(json.dumps(saved_norm) + "\n")
        if teacher is not None:
            t_record = {
                "workdir": str(Path(teacher_workdir).absolute()),
                "step": teacher.step,
                "model": config_lib.to_dict(teacher.config)["model"],
                "mode": teacher_mode,
            }
            (workdir / TEACHER_FILE).write_text(json.dumps(t_record, indent=1) + "\n")
    logger = RunLogger(workdir, enabled=primary, resume_step=start_step)
    if primary and start_step == 0:
        logger.log(
            {
                "event": "start",
                "step": 0,
                "role": role,
                "loss": loss,
                "split": split.name,
                "num_train_utterances": len(split.train_ids),
                "num_train_segments": len(data),  # this process's share
                "num_train_segments_global": num_global,
                "steps_per_epoch": spe,
                "total_steps": total_steps,
                "teacher": teacher_mode,
                "on_device": on_device,
                "num_devices": total_devices,
            }
        )

    # ---- replicate ------------------------------------------------------------------------
    r_state = replicate(state, devices=devices)
    r_teacher = None
    if teacher_mode == "live":
        r_teacher = replicate(
            {
                "params": teacher.variables["params"],
                "batch_stats": teacher.variables["batch_stats"],
            },
            devices=devices,
        )
    device_index = np.arange(num_local, dtype=np.int32)
    r_data = None
    if on_device:
        arrays = {"features": data.features, "labels": data.labels}
        if data.teacher_logits is not None:
            arrays["teacher_logits"] = data.teacher_logits
        r_data = replicate(arrays, devices=devices)

    ctx = _LoopContext(
        cfg=cfg,
        workdir=workdir,
        spe=spe,
        total_steps=total_steps,
        schedule=schedule,
        logger=logger,
        ckpt=ckpt,
        best_ckpt=best_ckpt,
        eval_sets=eval_sets,
        eval_model=eval_model,
        devices=devices,
        interval=interval,
        epoch_sums=epoch_sums,
        best=best,
        num_classes=num_classes,
        spec=spec,
        weights=weights,
        on_device=on_device,
        last_train=last_train,
    )
    batch_sharding = jax.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.P(AXIS))

    def put(batch):
        return jax.device_put(batch, batch_sharding)

    multi_cpu = devices[0].platform == "cpu" and total_devices > 1
    sync_every = min(cfg.train.log_every_steps, 8) if multi_cpu else cfg.train.log_every_steps
    bar = _progress(total_steps, start_step, cfg.train.progress)
    steps_this_run = 0
    last_eval: dict[str, Any] = {}
    t_start = time.perf_counter()
    try:
        step = start_step
        while step < total_steps:
            epoch, first = divmod(step, spe)
            t0 = time.perf_counter()
            if on_device:
                r_state, stacked = p_epoch(spe, local_batch, per_device, pidx)(
                    r_state,
                    r_data,
                    device_index,
                    r_teacher,
                    weights,
                    (data_key, step_key),
                    np.int32(epoch),
                    np.int32(first),
                )
                host = _unreplicate(stacked)
                per_step = [{k: v[i] for k, v in host.items()} for i in range(first, spe)]
                ctx.consume(per_step, step, r_state, time.perf_counter() - t0, bar)
                steps_this_run += spe - first
                step = (epoch + 1) * spe
                if 0 < cfg.train.debug_abort_after_steps <= steps_this_run:
                    raise SimulatedAbort(f"debug abort after {steps_this_run} steps")
            else:
                order = input_pipeline.host_epoch_order(
                    data_key, epoch, len(data), spe, local_batch, pidx
                )
                pending = []
                for batch in input_pipeline.iterate_batches(
                    data, order, num_devices=num_local, first_step=first, put=put
                ):
                    r_state, m = p_step(r_state, batch, r_teacher, weights, step_key)
                    pending.append(m)
                    step += 1
                    steps_this_run += 1
                    end_of_epoch = step % spe == 0
                    ck_due = cfg.train.checkpoint_every_steps and (
                        step % cfg.train.checkpoint_every_steps == 0
                    )
                    abort = 0 < cfg.train.debug_abort_after_steps <= steps_this_run
                    if len(pending) >= sync_every or end_of_epoch or ck_due or abort:
                        host = [_unreplicate(p) for p in pending]
                        ctx.consume(
                            host, step - len(pending), r_state, time.perf_counter() - t0, bar
                        )
                        pending = []
                        t0 = time.perf_counter()
                    if abort:
                        raise SimulatedAbort(f"debug abort after {steps_this_run} steps")
                    if ck_due and not end_of_epoch:
                        ctx.save(r_state, step)
            last_eval = ctx.end_epoch(r_state, step) or last_eval
    finally:
        bar.close()
        logger.close()

    # ---- final ----------------------------------------------------------------------------
    if not last_eval:  # resumed a finished run: evaluate the final state again
        last_eval = ctx.run_eval(_unreplicate(r_state), log=False)
    final_state = _unreplicate(r_state)
    if ckpt.latest_step() != total_steps:
        ctx.save(r_state, total_steps, state=final_state)
    ckpt.close()
    if best_ckpt is not None:
        best_ckpt.close()
    result = {
        "step": total_steps,
        "epoch": cfg.optim.num_epochs,
        "test": last_eval.get("test"),
        "validation": last_eval.get("validation"),
        "best_validation": ctx.best if ctx.best.get("ua") is not None else None,
        "train": ctx.last_train,
        "workdir": str(workdir),
        "on_device": on_device,
        "num_devices": total_devices,
        "process_count": pcount,
        "teacher": teacher_mode,
    }
    if primary:
        logger.enabled = True
        with open(workdir / METRICS_FILE, "a") as f:
            record = {"event": "final", "step": total_steps, **_strip(result)}
            record["timing"] = {"seconds": time.perf_counter() - t_start}
            f.write(json.dumps(record, sort_keys=True) + "\n")
    return result


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("workdir",)}


@dataclasses.dataclass
class _LoopContext:
    """Host-side state of the loop: metric sums, logging, evaluation, checkpoints."""

    cfg: config_lib.Config
    workdir: Path
    spe: int
    total_steps: int
    schedule: Any
    logger: RunLogger
    ckpt: checkpointing.Checkpointer
    best_ckpt: checkpointing.Checkpointer | None
    eval_sets: list
    eval_model: Any
    devices: tuple
    interval: MetricSums
    epoch_sums: MetricSums
    best: dict
    num_classes: int
    spec: StepSpec
    weights: dict
    on_device: bool
    last_train: dict = dataclasses.field(default_factory=dict)
    _last_ckpt_step: int = -1

    def consume(self, per_step: list, first_step: int, r_state, seconds: float, bar) -> None:
        """Adds per-step metrics (steps first_step, first_step+1, ...), logs intervals, and
        stops on a non-finite loss."""
        log_every = self.cfg.train.log_every_steps
        for i, m in enumerate(per_step):
            s = first_step + i + 1  # steps done after this one
            if float(m["nonfinite"]) > 0:
                self._nonfinite(r_state)
            self.interval.add(m)
            self.epoch_sums.add(m)
            if s % log_every == 0 or s % self.spe == 0:
                means = self.interval.means()
                epoch = (s - 1) // self.spe + 1
                lr = float(self.schedule(s - 1))
                kdw = (
                    float(kd_ramp(s - 1, self.weights["warmup_epochs"], self.spe))
                    if self.spec.teacher != "none"
                    else 0.0
                )
                rec = {
                    "event": "train",
                    "step": s,
                    "epoch": epoch,
                    "lr": lr,
                    "kd_weight": kdw,
                    **{k: means[k] for k in ("loss", "ce", "kd", "tckd", "nckd", "grad_norm")},
                }
                self.logger.log(
                    rec,
                    {
                        "train/loss": means["loss"],
                        "train/ce": means["ce"],
                        "train/tckd": means["tckd"],
                        "train/nckd": means["nckd"],
                        "train/kd": means["kd"],
                        "train/lr": lr,
                        "train/kd_weight": kdw,
                        "train/grad_norm": means["grad_norm"],
                    },
                )
                self.interval = MetricSums(self.num_classes)
        n = len(per_step)
        if n:
            bar.update(n)
            bar.set_postfix(
                epoch=(first_step + n - 1) // self.spe + 1,
                loss=f"{self.epoch_sums.means()['loss']:.4f}",
                steps_s=f"{n / max(seconds, 1e-9):.1f}",
            )

    def _nonfinite(self, r_state) -> None:
        state = _unreplicate(r_state)
        bad = int(state.bad_step)
        epoch, batch = divmod(bad, self.spe)
        good = state.replace(bad_step=np.int32(-1))
        self.save(None, bad, state=good)
        self.logger.log({"event": "nonfinite", "step": bad, "epoch": epoch + 1, "batch": batch})
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {bad} (epoch {epoch + 1}, batch {batch} of "
            f"{self.spe}); the last good state (step {bad}) is saved in "
            f"{self.workdir / checkpointing.CHECKPOINT_DIR}. Lower optim.learning_rate or set "
            "optim.grad_clip_norm, then rerun with --overwrite",
            step=bad,
            epoch=epoch + 1,
            batch=batch,
        )

    def run_eval(self, state, *, log: bool, step: int | None = None, epoch: int | None = None):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        out = {}
        for es in self.eval_sets:
            res = evaluate(
                self.eval_model,
                variables,
                es,
                batch_size=self.cfg.data.eval_batch_size,
                devices=self.devices,
            )
            out[es.name] = res
            if log:
                self.logger.log(
                    {"event": "eval", "split": es.name, "step": step, "epoch": epoch, **res},
                    {f"{es.name}/wa": res["wa"], f"{es.name}/ua": res["ua"]},
                )
        return out

    def end_epoch(self, r_state, step: int) -> dict:
        """Epoch-end work: train summary, evaluation, best and periodic checkpoints."""
        if step % self.spe:
            return {}
        epoch = step // self.spe
        means = self.epoch_sums.means()
        self.last_train = {"epoch": epoch, **means}
        self.logger.log(
            {"event": "epoch", "step": step, "epoch": epoch, **means},
            {"train/wa": means.get("wa"), "train/ua": means.get("ua")},
        )
        self.epoch_sums = MetricSums(self.num_classes)
        every = self.cfg.train.eval_every_epochs
        last = step >= self.total_steps
        result = {}
        state = None
        if (every and epoch % every == 0) or last:
            state = _unreplicate(r_state)
            result = self.run_eval(state, log=True, step=step, epoch=epoch)
            val = result.get("validation")
            if val is not None and self.best_ckpt is not None:
                if self.best.get("ua") is None or val["ua"] > self.best["ua"]:
                    self.best = {"ua": val["ua"], "step": step, "epoch": epoch}
                    self.best_ckpt.save(step, state, self._meta(step))
        ck_every = self.cfg.train.checkpoint_every_steps
        if self.on_device:  # the first epoch end at or after each multiple
            crossed = ck_every and (step // ck_every > (step - self.spe) // ck_every)
        else:  # saved mid-epoch at the exact multiples
            crossed = ck_every and step % ck_every == 0
        if last or crossed or (ck_every == 0 and result):
            self.save(r_state, step, state=state)
        return result

    def _meta(self, step: int) -> dict:
        return {
            "step": step,
            "epoch": step // self.spe,
            "steps_per_epoch": self.spe,
            "best": self.best,
            "interval": self.interval.to_json(),
            "epoch_sums": self.epoch_sums.to_json(),
            "last_train": self.last_train,
        }

    def save(self, r_state, step: int, *, state=None) -> None:
        if step == self._last_ckpt_step:
            return
        if state is None:
            state = _unreplicate(r_state)
        self.ckpt.save(step, state, self._meta(step))
        self._last_ckpt_step = step
