"""The train state, the optimiser and the learning-rate schedules.

A :class:`TrainState` is everything that changes during training and is checkpointed. The
optimiser is Adam with *coupled* L2 weight decay (added to the gradient, as PyTorch's
``Adam(weight_decay=...)`` does; not AdamW), optional global-norm clipping, and a schedule from
:func:`learning_rate_schedule`.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dkd_jax import config as config_lib
from dkd_jax import models

__all__ = [
    "TRACE_COUNTS",
    "TrainState",
    "create_optimizer",
    "create_train_state",
    "init_variables",
    "learning_rate_schedule",
]

TRACE_COUNTS: collections.Counter = collections.Counter()
"""How often the jitted initialisation was traced (tests assert it is shared between runs)."""


def learning_rate_schedule(
    optim: config_lib.OptimConfig, *, steps_per_epoch: int, total_steps: int
):
    """The learning rate as a function of the optimiser step (jnp-traceable, also on host).

    ``steps_per_epoch`` and ``total_steps`` may be traced int32 scalars: the compiled step takes
    them as runtime values, so runs of different lengths (folds of different sizes) share one
    executable. ``step_epochs`` follows the lineage exactly: after finishing 0-based epoch
    ``i > 0`` with ``i % decay_every == 0`` the rate is multiplied by ``decay_factor``, so epochs
    0..10 run at the peak, 11..20 at 1/10 (decay_every 10). ``warmup_steps`` ramps linearly
    first.
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
            epoch = count // jnp.asarray(steps_per_epoch, jnp.int32)
            k = jnp.maximum(epoch - 1, 0) // every
            value = lr * jnp.asarray(factor, jnp.float32) ** k.astype(jnp.float32)
        elif kind == "cosine":
            span = jnp.maximum(jnp.asarray(total_steps, jnp.int32) - warm, 1)
            frac = (count - warm).astype(jnp.float32) / span.astype(jnp.float32)
            frac = jnp.clip(frac, 0.0, 1.0)
            value = 0.5 * lr * (1.0 + jnp.cos(jnp.pi * frac))
        else:  # validated by Config
            raise ValueError(f"unknown schedule {kind!r}")
        if warm > 0:
            ramp = jnp.minimum((count + 1).astype(jnp.float32) / warm, 1.0)
            value = value * ramp
        return value.astype(jnp.float32)

    return schedule


def create_optimizer(
    optim: config_lib.OptimConfig, *, steps_per_epoch=1, total_steps=1
) -> optax.GradientTransformation:
    """Adam with coupled L2 (PyTorch ``Adam(weight_decay=...)``), not AdamW::

    chain([clip_by_global_norm], add_decayed_weights(wd), scale_by_adam, scale_by_lr(schedule))

    The state's structure does not depend on ``steps_per_epoch``/``total_steps`` (they may be
    traced), so ``create_optimizer(optim).init`` initialises the state of any run length.
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
    variables = init_variables(rng, model, segment_shape)
    params = variables["params"]
    opt_state = jax.device_get(jax.jit(tx.init)(params))
    return TrainState(
        step=np.zeros((), np.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=opt_state,
        bad_step=np.full((), -1, np.int32),
    )


def init_variables(rng: jax.Array, model: models.MACNN, segment_shape) -> dict[str, Any]:
    """A model's initial variables {"params", "batch_stats"} (host numpy) for inputs
    [batch, *segment_shape, 1], from the same cached jitted init as :func:`create_train_state`
    (e.g. a frozen teacher's shape in a benchmark, without an optimiser)."""
    model = model.clone(batch_norm_axis_name=None)
    return jax.device_get(_variables_init(model, tuple(segment_shape))(rng))


INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}
"""XLA:CPU compiles the initialisation (threefry random bits for every parameter, run once) in
~1.5 s at LLVM level 1 against ~3.7 s at the default level, with the same bits
(tests/test_train_lib.py checks every preset). Only here: the training steps at level 1 round
differently at some input shapes (README, "Tried and not kept")."""


def _init_function(model, segment_shape):
    """``rng -> {"params", "batch_stats"}`` for inputs [1, *segment_shape, 1] (not jitted)."""
    shape = (1, *segment_shape, 1)

    def init(rng):
        TRACE_COUNTS["init"] += 1
        variables = model.init(rng, jnp.zeros(shape, jnp.float32), train=False)
        return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

    return init


@functools.lru_cache(maxsize=32)
def _variables_init(model, segment_shape):
    options = INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    return jax.jit(_init_function(model, segment_shape), compiler_options=options)
