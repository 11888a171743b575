"""The compiled core of training: one data-parallel optimiser step, and one on-device epoch.

:func:`train_step` runs on one device's share of the global batch under ``jax.pmap`` (axis
``distributed.AXIS``): augmentation, the frozen teacher (precomputed logits or live), the
objective (``objective``), the gradient ``psum`` and synchronised BatchNorm statistics, the
optimiser update, and a non-finite guard. :func:`train_epoch` scans it over an epoch with the
data on the device. :func:`make_train_functions` builds and caches the pmapped versions, so runs
of one architecture and shape (folds, ablations) share compiled code. ``train_lib`` drives them.

Data parallelism: each device's loss is its sum over real segments divided by the global count
of real segments, so ``psum`` of the gradients is exactly the gradient of the global-batch mean
(``pmean`` of per-device means would over-weight a device holding padding). BatchNorm batch
statistics are means over all devices (``lax.pmean``), so N devices compute what one device
computes on the whole batch (up to float summation order).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from dkd_jax import config as config_lib
from dkd_jax import distributed, eval_lib, input_pipeline, objective, train_loop, train_state

__all__ = [
    "TRACE_COUNTS",
    "StepSpec",
    "TrainFunctions",
    "clear_caches",
    "hyper",
    "make_train_functions",
    "train_epoch",
    "train_step",
]

AXIS = distributed.AXIS
TRACE_COUNTS: collections.Counter = collections.Counter()
"""How often each compiled function was traced (tests assert one trace per run)."""


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static (hashable) part of a train step; one compilation per distinct spec.

    Neither the loss choice nor the run length is static: the loss weights and the schedule's
    steps per epoch and total steps are runtime values of the compiled step (:func:`hyper`), so
    the dkd / kd / tckd / nckd students of one architecture, and every fold of an experiment
    whatever its size, share one compilation (and the persistent compilation cache serves
    later processes).
    """

    teacher: str  # "none" | "precomputed" | "live"
    augment: tuple  # AugmentConfig values (dataclasses.astuple)
    num_classes: int

    @property
    def augment_config(self) -> config_lib.AugmentConfig:
        return config_lib.AugmentConfig(*self.augment)


def hyper(weights: dict, *, steps_per_epoch: int, total_steps: int) -> dict:
    """The runtime values of a step: ``objective.loss_weights`` plus the run's steps per epoch
    and total steps (int32; the KD warm-up ramp and the learning-rate schedule use them)."""
    return {
        **weights,
        "steps_per_epoch": np.int32(steps_per_epoch),
        "total_steps": np.int32(total_steps),
    }


def _zero_metrics(num_classes: int) -> dict:
    out = {k: jnp.zeros((), jnp.float32) for k in train_loop.METRIC_KEYS}
    out["confusion"] = jnp.zeros((num_classes, num_classes), jnp.float32)
    return out


def train_step(
    state, batch, teacher_vars, weights, rng, *, model, teacher_model, optim, spec: StepSpec
):
    """One optimiser step on one device's share of the global batch (call under pmap).

    Args:
      state: TrainState (this device's replica).
      batch: features [P, F, T], labels [P], mask [P] bool (+ teacher_logits [P, C]).
      teacher_vars: frozen teacher variables (live teacher) or None.
      weights: :func:`hyper` (loss weights, steps per epoch, total steps).
      rng: the run's step key (folded with the step and the device index here).
      model: the trained MACNN (BatchNorm synchronised over AXIS).
      teacher_model: the frozen teacher (live teacher) or None.
      optim: optimiser settings (the optimiser is built here, on the runtime run length).
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
    x, labels_b, lam, teacher_logits = _step_inputs(
        batch, maskf, aug_key, teacher_vars, teacher_model=teacher_model, spec=spec
    )
    ramp = objective.kd_ramp(state.step, weights["warmup_epochs"], weights["steps_per_epoch"])
    tx = train_state.create_optimizer(
        optim, steps_per_epoch=weights["steps_per_epoch"], total_steps=weights["total_steps"]
    )

    def loss_fn(params):
        logits, mutated = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_key},
        )
        terms = objective.loss_terms(
            logits, teacher_logits, labels, labels_b, lam, temperature=weights["temperature"]
        )
        total = jnp.where(mask, objective.objective(terms, weights, ramp), 0.0)
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
    # A finite loss and gradient can still give a non-finite update (an absurd learning rate):
    # keeping it would poison every later step.
    ok = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))

    out = _zero_metrics(spec.num_classes)
    out.update(count=count, loss=loss_sum, grad_norm=grad_norm, nonfinite=(~ok).astype(jnp.float32))
    out.update(_term_sums_and_confusion(terms, logits, labels, mask, maskf, spec.num_classes))
    updated = train_state.TrainState(
        step=state.step + 1,
        params=new_params,
        batch_stats=new_stats,
        opt_state=new_opt,
        bad_step=state.bad_step,
    )
    failed = state.replace(bad_step=state.step)
    new_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), updated, failed)
    return new_state, out


def _step_inputs(batch, maskf, aug_key, teacher_vars, *, teacher_model, spec: StepSpec):
    """The step's (augmented) inputs [P, F, T, 1], mixup partner labels and weights, and the
    frozen teacher's logits (precomputed, or live on the augmented input; None without one)."""
    labels = batch["labels"]
    x = batch["features"][..., None]
    labels_b, lam = labels, jnp.ones_like(maskf)
    aug = spec.augment_config
    if aug.enabled:
        x, labels_b, lam = objective.augment_batch(x, labels, aug_key, aug)
    teacher_logits = None
    if spec.teacher == "precomputed":
        teacher_logits = batch["teacher_logits"]
    elif spec.teacher == "live":
        teacher_logits = teacher_model.apply(teacher_vars, x, train=False)
    if teacher_logits is not None:
        teacher_logits = lax.stop_gradient(teacher_logits.astype(jnp.float32))
    return x, labels_b, lam, teacher_logits


def _term_sums_and_confusion(terms, logits, labels, mask, maskf, num_classes: int) -> dict:
    """Global sums over real segments of each loss term, and the segment confusion matrix."""
    out = {}
    for name in ("ce", "kd", "tckd", "nckd"):
        if name in terms:
            out[name] = lax.psum(jnp.sum(jnp.where(mask, terms[name], 0.0)), AXIS)
    pred = jnp.argmax(logits, axis=-1)
    onehot_true = jax.nn.one_hot(labels, num_classes) * maskf[:, None]
    onehot_pred = jax.nn.one_hot(pred, num_classes)
    out["confusion"] = lax.psum(onehot_true.T @ onehot_pred, AXIS)
    return out


def _guarded_step(state, batch, teacher_vars, weights, rng, active, *, step_fn):
    """Runs ``step_fn`` and keeps its result only when ``active`` and the state is healthy
    (no earlier non-finite loss); otherwise the state is unchanged and the metrics are zero.

    A select rather than ``lax.cond``: on XLA:CPU a step inside a conditional ran 10x slower
    (measured: 0.98 s vs 0.09 s per batch-32 student step), and skipped steps only happen when
    resuming mid-epoch on the on-device path or after a non-finite loss.
    """
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
      weights: ``objective.loss_weights``.
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
        )

    return lax.scan(body, state, jnp.arange(num_steps))


class TrainFunctions(NamedTuple):
    """The compiled functions of a run (see :func:`make_train_functions`)."""

    tx: optax.GradientTransformation
    # (state[D], batch[D], teacher_vars[D] | None, hyper, step_key) -> (state, metrics)
    p_step: Any
    # (num_steps, local_batch, per_device, process_index) -> pmapped :func:`train_epoch`
    p_epoch: Any


def make_train_functions(
    model,
    teacher_model,
    optim: config_lib.OptimConfig,
    spec: StepSpec,
    devices: Sequence,
) -> TrainFunctions:
    """The optimiser and the pmapped step and epoch functions of a run.

    Cached on all arguments, so runs of one architecture and segment shape in one process
    (tests, cross-validation folds of any size, the KD ablations) share compiled code.

    Args:
      model: the trained MACNN with ``batch_norm_axis_name=AXIS``.
      teacher_model: the frozen teacher when it runs live in the step, else None.
      optim: optimiser settings.
      spec: static step description.
      devices: the local devices of the pmap.
    """
    return _compiled(model, teacher_model, dataclasses.astuple(optim), spec, tuple(devices))


@functools.lru_cache(maxsize=16)
def _compiled(model, teacher_model, optim_key, spec: StepSpec, devices):
    optim = config_lib.OptimConfig(*optim_key)
    step_fn = functools.partial(
        train_step, model=model, teacher_model=teacher_model, optim=optim, spec=spec
    )

    def one_step(state, batch, teacher_vars, weights, rng):
        TRACE_COUNTS["step_fn"] += 1
        return _guarded_step(state, batch, teacher_vars, weights, rng, True, step_fn=step_fn)

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

    return TrainFunctions(train_state.create_optimizer(optim), p_step, p_epoch)


def clear_caches() -> None:
    """Forgets compiled functions and trace counts (tests)."""
    _compiled.cache_clear()
    eval_lib._predict_fn.cache_clear()
    train_state._variables_init.cache_clear()
    TRACE_COUNTS.clear()
    eval_lib.TRACE_COUNTS.clear()
    train_state.TRACE_COUNTS.clear()
