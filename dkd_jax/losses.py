"""Distillation losses for DKDFMH: cross-entropy, Hinton KD and Decoupled KD (TCKD, NCKD, DKD).

This module owns the loss numerics of the project and nothing else. Every function is pure
(arrays in, arrays out, keyword hyperparameters, no config, no global state), imports only
``jax`` (``jax.numpy``, ``jax.experimental.checkify``) and ``numpy``, and each loss returns one
float32 value
per example, shape ``[batch]``; the caller reduces (``.mean()``, a masked mean, a ``pmean`` ...).
All functions work under ``jax.jit``, ``jax.vmap``, ``jax.grad`` and ``jax.pmap``, so they can be
copied into or imported by any JAX project::

    from dkd_jax.losses import dkd_loss

Notation (paper_spec.md §3): ``z`` are logits ``[batch, num_classes]``, ``T`` is the temperature,
``t`` the target class of an example, ``p = softmax(z / T)``; superscript ``T``/``S`` marks the
teacher/student. The distillation losses include the usual ``T**2`` factor, so that their gradient
scale does not depend on the temperature (Hinton et al., 2015).

Numerics. Logits of any float dtype (bfloat16 included) are cast to float32 first. Everything is
computed in log space from ``logsumexp`` over explicit boolean class masks: the target/non-target
split uses ``log p_t = z_t/T - logsumexp(z/T)`` and
``log(1 - p_t) = logsumexp_{i != t}(z_i/T) - logsumexp(z/T)``, the non-target distribution uses
a ``logsumexp`` restricted to the non-target classes (no ``-1000 * one_hot`` trick), and every
KL term ``p * (log p - log q)`` is set to exactly 0 where ``p == 0`` (``xlogy`` convention). There
is no ``log(softmax(...))`` anywhere. Results and gradients stay finite for logits up to
``±1e4``, for one-hot-like teachers, and for two classes (where NCKD is a KL over one class and
exactly 0).
The teacher logits are wrapped in ``jax.lax.stop_gradient``: the teacher never receives gradient.

Temperature range. Each KL is a difference of log-probabilities that differ by O(1/T) and is
then scaled by ``T**2``, so float32 rounding grows with ``T``. Against a float64 reference
(``dkd_loss``, 64 examples of 4 classes with logits 3·N(0, 1), α 1, β 8) the largest relative
error of the per-example value is 6e-6 at T = 4, 3e-4 at 30, 3e-3 at 100, 0.2 at 1e3, and at 1e4
values come out negative. A concrete temperature above :data:`MAX_ACCURATE_TEMPERATURE` (100)
therefore warns.

Bad values. Labels must be integer class ids in ``[0, num_classes)``. Shapes and dtypes are
validated at trace time (``ValueError`` / ``TypeError`` naming the function and the problem), and
concrete values (eager calls, constants closed over by a jitted function) raise ``ValueError``.
Traced values cannot raise, so they poison the result instead: an example whose label is out of
range gets a NaN loss, and a temperature that is not finite and > 0 (or an ``alpha`` / ``beta`` of
``dkd_loss`` that is not finite and >= 0) makes every example NaN, so that a training loop that
checks its loss for NaN stops; a NaN or +inf teacher logit, or a teacher row of -inf only, makes
its example NaN too (one -inf logit is a class the teacher rules out: probability 0; a teacher
ruling out every class but the target, e.g. ``log(one_hot(labels))``, gives TCKD = T²·(-log of
the student's target probability) and NCKD = 0). The NaN stays in its example: the other
examples' values and gradients do not change (bit for bit), and an example with a bad label or
teacher row gets zero gradient, so a mean over the valid examples (``jnp.where(valid, loss,
0)``, not ``loss * valid``: NaN times 0 is NaN) stays finite. ``guard_teacher=False`` leaves the
teacher rows untested, for logits known to be finite (a trained network's): the training step
passes it, because the tests change how XLA fuses a jitted program, so values and gradients
of finite inputs can move in their last bits (about 1 ulp) against the untested formula, and
runs made before the tests must ``reproduce`` bit for bit. Labels may have any integer
dtype. For a raised error inside ``jit``, call :func:`validate_labels` /
:func:`validate_temperature` in a function wrapped with ``jax.experimental.checkify.checkify``.

References:
  B. Zhao, Q. Cui, R. Song, Y. Qiu, J. Liang, "Decoupled Knowledge Distillation", CVPR 2022,
  arXiv:2203.08679.
  Z. Zhao, H. Wang, H. Wang, B. Schuller, "Hierarchical Network with Decoupled Knowledge
  Distillation for Speech Emotion Recognition", ICASSP 2023, arXiv:2303.05134.
  G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network", 2015,
  arXiv:1503.02531.
"""

from __future__ import annotations

import operator
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

__all__ = [
    "MAX_ACCURATE_TEMPERATURE",
    "cross_entropy",
    "dkd_loss",
    "kd_loss",
    "nckd_loss",
    "tckd_loss",
    "validate_labels",
    "validate_temperature",
]

_WHERE = "dkd_jax.losses"


# --------------------------------------------------------------------------------------------
# Validation (trace-time: shapes, dtypes, Python-level hyperparameters)
# --------------------------------------------------------------------------------------------


#: Above this temperature the float32 loss values lose accuracy (module docstring): a concrete
#: temperature above it warns.
MAX_ACCURATE_TEMPERATURE = 100.0


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _host_value(x):
    """``x`` as a NumPy value when it is known now (a Python number, a NumPy value, a concrete
    jax Array, even one closed over by a jitted function), else None (a tracer). ``x`` is the
    caller's own object: ``jnp.asarray`` of a NumPy constant inside a trace is a tracer."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(jax.device_get(x))


def _check_logits(fn: str, name: str, x, *, min_classes: int) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{_WHERE}.{fn}: {name} must be a floating-point array, got dtype {x.dtype}"
        )
    if x.ndim != 2:
        raise ValueError(
            f"{_WHERE}.{fn}: {name} must have shape [batch, num_classes], got shape {x.shape}"
        )
    if x.shape[1] < min_classes:
        raise ValueError(
            f"{_WHERE}.{fn}: {name} needs at least {min_classes} classes, got shape {x.shape}"
        )
    return x.astype(jnp.float32)


def _check_labels(fn: str, labels, *, batch: int, num_classes: int) -> jax.Array:
    if labels is None:
        raise TypeError(f"{_WHERE}.{fn}: labels are required: integer class ids [batch]")
    raw = labels
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"{_WHERE}.{fn}: labels must be integer class ids, got dtype {labels.dtype}"
        )
    if labels.shape != (batch,):
        raise ValueError(
            f"{_WHERE}.{fn}: labels must have shape [batch] = ({batch},), got shape {labels.shape}"
        )
    host = _host_value(raw)
    if host is not None and batch > 0:
        # Host-side reduction: jnp.min inside a jit trace would return a tracer even for a
        # concrete array captured from outside the function.
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{_WHERE}.{fn}: labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]"
            )
    return labels


def _check_scalar(
    fn: str, name: str, value, *, positive: bool, warn_above: float | None = None
) -> jax.Array:
    """Validates a scalar hyperparameter; concrete values must be finite and > 0 (or >= 0)
    *in float32*, the precision the loss uses (1e-50 would become 0, 1e40 infinity)."""
    if isinstance(value, bool | str | bytes):
        raise TypeError(f"{_WHERE}.{fn}: {name} must be a number, got {value!r}")
    if isinstance(value, int | float):
        concrete = float(value)  # checked in Python: no device round trip
    else:
        arr = jnp.asarray(value)
        if arr.ndim != 0:
            raise ValueError(f"{_WHERE}.{fn}: {name} must be a scalar, got shape {arr.shape}")
        if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
            raise TypeError(f"{_WHERE}.{fn}: {name} must be a real number, got dtype {arr.dtype}")
        host = _host_value(value)
        concrete = float(host) if host is not None else None
    if concrete is not None:
        with np.errstate(over="ignore"):
            as32 = float(np.float32(concrete))
        ok = as32 > 0 if positive else as32 >= 0
        if not ok or as32 != as32 or as32 == float("inf"):
            bound = "> 0" if positive else ">= 0"
            cast = f" ({as32} in float32)" if as32 != concrete and concrete == concrete else ""
            raise ValueError(
                f"{_WHERE}.{fn}: {name} must be finite and {bound}, got {concrete}{cast}"
            )
        if warn_above is not None and concrete > warn_above:
            warnings.warn(
                f"{_WHERE}.{fn}: {name}={concrete:g} is above {warn_above:g}: float32 loss values "
                "lose accuracy there (a relative error of 3e-3 at 100, 0.2 at 1e3; see the "
                "module docstring)",
                stacklevel=4,
            )
    return jnp.asarray(value, jnp.float32)


def _in_range(labels: jax.Array, num_classes: int) -> jax.Array:
    """``0 <= labels < num_classes``, elementwise, for labels of any integer dtype: a
    ``num_classes`` beyond the dtype's range (300 classes, uint8 labels) must not wrap around."""
    ok = labels >= 0
    if num_classes <= jnp.iinfo(labels.dtype).max:
        ok = ok & (labels < num_classes)
    return ok


def _guard_labels(labels: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """(int32 labels with out-of-range ids replaced by class 0, in-range mask [B]).

    The bad examples are computed with a harmless label (finite values and gradients) and set to
    NaN at the end by :func:`_poison`, so that no NaN reaches the other examples' gradients.
    """
    ok = _in_range(labels, num_classes)
    return jnp.where(ok, labels, jnp.zeros_like(labels)).astype(jnp.int32), ok


def _guard_scalar(value: jax.Array, *, positive: bool, safe: float) -> tuple[jax.Array, jax.Array]:
    """(value, or ``safe`` where it is not finite and > 0 / >= 0; scalar bool validity)."""
    ok = jnp.isfinite(value) & ((value > 0) if positive else (value >= 0))
    return jnp.where(ok, value, safe), ok


def _guard_teacher(t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(teacher logits with unusable rows replaced by zeros, usable-row mask [B]).

    A row is unusable when a logit is NaN or +inf, or every logit is -inf (no distribution).
    Such an example's loss is NaN (:func:`_poison`), but it is computed from the harmless zeros:
    a NaN inside the row would reach the gradients through a zero cotangent (0 · NaN), so that
    ``jnp.where(valid, loss, 0)`` left the other examples' shared gradients NaN. A -inf logit
    alone is a class the teacher rules out (probability 0) and stays."""
    ok = jnp.all(~jnp.isnan(t) & (t != jnp.inf), axis=-1) & jnp.any(t != -jnp.inf, axis=-1)
    return jnp.where(ok[:, None], t, jnp.zeros_like(t)), ok


def _poison(loss: jax.Array, ok: jax.Array) -> jax.Array:
    """NaN where ``ok`` ([batch] or scalar) is False; ``loss`` itself where it is True."""
    return jnp.where(ok, loss, jnp.nan)


def _prepare(fn, student_logits, teacher_logits, labels, temperature, *, guard):
    """Validates inputs; returns (z_s / T, stop_gradient(z_t) / T, target mask, T, ok).
    ``labels`` None: no target mask (``kd_loss`` only; the other losses refuse None first).

    ``ok`` is False for examples whose loss must be NaN (label out of range, or a temperature that
    is not finite and > 0, and with ``guard`` a teacher row that is NaN, +inf or all -inf); the
    returned target mask, teacher row and ``T`` are safe stand-ins there.
    """
    min_classes = 1 if fn == "kd_loss" else 2  # the decoupled terms need a non-target class
    s = _check_logits(fn, "student_logits", student_logits, min_classes=min_classes)
    t = _check_logits(fn, "teacher_logits", teacher_logits, min_classes=min_classes)
    if s.shape != t.shape:
        raise ValueError(
            f"{_WHERE}.{fn}: student_logits and teacher_logits must have the same shape, "
            f"got {s.shape} and {t.shape}"
        )
    temp = _check_scalar(
        fn, "temperature", temperature, positive=True, warn_above=MAX_ACCURATE_TEMPERATURE
    )
    temp, ok = _guard_scalar(temp, positive=True, safe=1.0)
    if not isinstance(guard, bool):
        raise TypeError(f"{_WHERE}.{fn}: guard_teacher must be True or False, got {guard!r}")
    if guard:
        t, teacher_ok = _guard_teacher(t)
        ok = ok & teacher_ok
    batch, num_classes = s.shape
    target = None
    if labels is not None or fn != "kd_loss":
        labels = _check_labels(fn, labels, batch=batch, num_classes=num_classes)
        labels, label_ok = _guard_labels(labels, num_classes)
        ok = ok & label_ok
        target = labels[:, None] == jnp.arange(num_classes, dtype=jnp.int32)[None, :]
    return s / temp, jax.lax.stop_gradient(t) / temp, target, temp, ok


# --------------------------------------------------------------------------------------------
# Log-space building blocks
# --------------------------------------------------------------------------------------------


def _masked_logsumexp(x: jax.Array, mask: jax.Array) -> jax.Array:
    """logsumexp over the last axis restricted to ``mask`` (every row needs >= 1 True): [B]."""
    m = jax.lax.stop_gradient(jnp.max(jnp.where(mask, x, -jnp.inf), axis=-1, keepdims=True))
    # Masked-out entries become exp(-inf) = 0 *before* the exp, so no inf/NaN reaches gradients.
    shifted = jnp.where(mask, x - m, -jnp.inf)
    return m[..., 0] + jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))


def _kl_from_logs(log_p: jax.Array, log_q: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """sum_i p_i (log p_i - log q_i) over the last axis, with 0 where p_i == 0 or mask is False.

    Only an exact 0 is dropped: a NaN teacher probability (a NaN or +inf teacher logit) stays
    NaN, so the loss says what the gradient would (a ``p > 0`` test dropped it: loss 0, gradient
    NaN). A -inf teacher logit (a masked class) gives p = 0 and is dropped.
    """
    p = jnp.exp(log_p)
    keep = p != 0 if mask is None else (p != 0) & mask
    return jnp.sum(jnp.where(keep, p * (log_p - log_q), 0.0), axis=-1)


def _binary_log_probs(z: jax.Array, target: jax.Array) -> jax.Array:
    """[log p_t, log(1 - p_t)] of softmax(z), both from logsumexp (never log of a sum): [B, 2]."""
    lse_all = jax.nn.logsumexp(z, axis=-1)
    z_target = jnp.sum(jnp.where(target, z, 0.0), axis=-1)
    lse_other = _masked_logsumexp(z, ~target)
    return jnp.stack([z_target - lse_all, lse_other - lse_all], axis=-1)


def _non_target_log_probs(z: jax.Array, target: jax.Array) -> jax.Array:
    """log of softmax over the non-target classes only; 0 (unused) at the target: [B, C]."""
    other = ~target
    lse_other = _masked_logsumexp(z, other)
    return jnp.where(other, z - lse_other[:, None], 0.0)


def _teacher_sure_of_target(zt: jax.Array, target: jax.Array) -> jax.Array:
    """[B] bool: every non-target teacher logit is -inf (the teacher rules out every other
    class, e.g. ``log(one_hot(labels))``): p_t = 1 and no non-target distribution exists."""
    return jnp.all(jnp.where(target, -jnp.inf, zt) == -jnp.inf, axis=-1)


def _tckd(zs, zt, target, guard=True):
    # A sure teacher's non-target log-sum-exp would be -inf - -inf = NaN: computed on a finite
    # stand-in (target 0, the others -1) whose probability ~1 - 1e-... is then replaced by the
    # exact [log 1, log 0]. Only the teacher's side is touched: the student's numbers (and its
    # gradients, bit for bit) are the formula's.
    if not guard:
        return _kl_from_logs(_binary_log_probs(zt, target), _binary_log_probs(zs, target))
    sure = _teacher_sure_of_target(zt, target)
    safe = jnp.where(sure[:, None], jnp.where(target, 0.0, -1.0), zt)
    log_pt = _binary_log_probs(safe, target)
    log_pt = jnp.where(sure[:, None], jnp.array([0.0, -jnp.inf], log_pt.dtype), log_pt)
    return _kl_from_logs(log_pt, _binary_log_probs(zs, target))


def _nckd(zs, zt, target, guard=True):
    # A sure teacher has no non-target distribution: its NCKD is 0 (KD = TCKD + (1 - p_t) ·
    # NCKD with p_t = 1), from a finite stand-in whose every term is then dropped.
    if not guard:
        return _kl_from_logs(
            _non_target_log_probs(zt, target), _non_target_log_probs(zs, target), ~target
        )
    sure = _teacher_sure_of_target(zt, target)
    safe = jnp.where(sure[:, None], jnp.zeros_like(zt), zt)
    kept = ~target & ~sure[:, None]
    return _kl_from_logs(
        _non_target_log_probs(safe, target), _non_target_log_probs(zs, target), kept
    )


# --------------------------------------------------------------------------------------------
# Public losses
# --------------------------------------------------------------------------------------------


def cross_entropy(logits, labels) -> jax.Array:
    r"""Softmax cross-entropy with integer labels, per example.

    .. math::
        \mathrm{CE}(z, y) = -\log \mathrm{softmax}(z)_y = \operatorname{logsumexp}(z) - z_y

    Args:
      logits: [batch, num_classes] float logits (any float dtype; computed in float32).
      labels: [batch] integer class ids in ``[0, num_classes)``.

    Returns:
      [batch] float32 per-example losses (>= 0); NaN for an example whose (traced) label is out
      of range.

    Raises:
      TypeError / ValueError: bad dtypes, shapes, or (when concrete) out-of-range labels.

    Examples:
      >>> import jax.numpy as jnp
      >>> from dkd_jax.losses import cross_entropy
      >>> ce = cross_entropy(jnp.array([[0.0, jnp.log(3.0)]]), jnp.array([1]))
      >>> print(f"{float(ce[0]):.4f}")  # -log(3/4)
      0.2877
    """
    z = _check_logits("cross_entropy", "logits", logits, min_classes=1)
    labels = _check_labels("cross_entropy", labels, batch=z.shape[0], num_classes=z.shape[1])
    labels, ok = _guard_labels(labels, z.shape[1])
    lse = jax.nn.logsumexp(z, axis=-1)
    z_y = jnp.take_along_axis(z, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return _poison(lse - z_y, ok)


def kd_loss(student_logits, teacher_logits, *, temperature=4.0, guard_teacher=True) -> jax.Array:
    r"""Classical (Hinton) knowledge distillation loss, per example, scaled by ``T**2``.

    .. math::
        \mathrm{KD} = T^2 \, \mathrm{KL}(p^{T} \,\|\, p^{S})
                    = T^2 \sum_i p^{T}_i \left(\log p^{T}_i - \log p^{S}_i\right),
        \qquad p = \mathrm{softmax}(z / T)

    Its batch mean is mdistiller's ``kd_loss`` (``KL(sum) / batch * T**2``).

    Args:
      student_logits: [batch, num_classes] float student logits (computed in float32).
      teacher_logits: [batch, num_classes] float teacher logits; no gradient flows to them.
      temperature: softmax temperature ``T > 0`` (Python float or scalar array).
      guard_teacher: test each teacher row (default): one holding NaN or +inf, or only -inf,
        gets a NaN loss and zero gradient. ``False`` skips the test (see "Bad values" in the
        module docstring).

    Returns:
      [batch] float32 per-example losses (>= 0); all NaN for a (traced) temperature that is not
      finite and > 0.

    Examples:
      >>> import jax.numpy as jnp
      >>> from dkd_jax.losses import kd_loss
      >>> s = jnp.array([[0.0, 0.0]])
      >>> t = jnp.array([[jnp.log(3.0), 0.0]])  # teacher p = [3/4, 1/4]
      >>> print(f"{float(kd_loss(s, t, temperature=1.0)[0]):.4f}")  # 3/4 log(3/2) + 1/4 log(1/2)
      0.1308

    References:
      G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network", 2015.
    """
    zs, zt, _, temp, ok = _prepare(
        "kd_loss", student_logits, teacher_logits, None, temperature, guard=guard_teacher
    )
    log_ps = zs - jax.nn.logsumexp(zs, axis=-1, keepdims=True)
    log_pt = zt - jax.nn.logsumexp(zt, axis=-1, keepdims=True)
    return _poison(temp**2 * _kl_from_logs(log_pt, log_ps), ok)


def tckd_loss(
    student_logits, teacher_logits, labels, *, temperature=4.0, guard_teacher=True
) -> jax.Array:
    r"""Target-class knowledge distillation (TCKD), per example, scaled by ``T**2``.

    KL between the binary (target vs. all non-target) distributions ``b = [p_t, 1 - p_t]``:

    .. math::
        \mathrm{TCKD} = T^2 \left( b^{T}_t \log\frac{b^{T}_t}{b^{S}_t}
                        + b^{T}_{\setminus t} \log\frac{b^{T}_{\setminus t}}{b^{S}_{\setminus t}}
                        \right)

    computed from ``log p_t = z_t/T - logsumexp(z/T)`` and
    ``log(1 - p_t) = logsumexp_{i != t}(z_i/T) - logsumexp(z/T)``.

    Args:
      student_logits: [batch, num_classes] float student logits, ``num_classes >= 2``.
      teacher_logits: [batch, num_classes] float teacher logits; no gradient flows to them.
      labels: [batch] integer target class ids in ``[0, num_classes)``.
      temperature: softmax temperature ``T > 0``.
      guard_teacher: test each teacher row (default): one holding NaN or +inf, or only -inf,
        gets a NaN loss and zero gradient; one sure of the target (every other logit -inf)
        TCKD of the target alone and NCKD 0. ``False`` skips the tests (see "Bad values" in
        the module docstring).

    Returns:
      [batch] float32 per-example losses (>= 0); NaN for an example whose (traced) label is out
      of range, and for every example when a (traced) temperature is not finite and > 0.

    Examples:
      >>> import jax.numpy as jnp
      >>> from dkd_jax.losses import tckd_loss
      >>> s = jnp.array([[0.0, jnp.log(2.0), 0.0]])  # p^S = [1/4, 1/2, 1/4]
      >>> t = jnp.array([[jnp.log(2.0), 0.0, 0.0]])  # p^T = [1/2, 1/4, 1/4]
      >>> print(f"{float(tckd_loss(s, t, jnp.array([0]), temperature=1.0)[0]):.4f}")
      0.1438

    References:
      B. Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.
    """
    zs, zt, target, temp, ok = _prepare(
        "tckd_loss", student_logits, teacher_logits, labels, temperature, guard=guard_teacher
    )
    return _poison(temp**2 * _tckd(zs, zt, target, guard_teacher), ok)


def nckd_loss(
    student_logits, teacher_logits, labels, *, temperature=4.0, guard_teacher=True
) -> jax.Array:
    r"""Non-target-class knowledge distillation (NCKD), per example, scaled by ``T**2``.

    KL between the distributions over the non-target classes only,
    ``p̂_i = exp(z_i/T) / sum_{j != t} exp(z_j/T)`` for ``i != t``:

    .. math::
        \mathrm{NCKD} = T^2 \sum_{i \ne t} \hat p^{T}_i
                        \left(\log \hat p^{T}_i - \log \hat p^{S}_i\right)

    The target class is removed with a boolean mask (mdistiller subtracts ``1000`` from the target
    logit instead; the two agree to float precision while ``|logit gaps| / T`` stay well below
    1000; beyond that the target's probability leaks into mdistiller's NCKD, while the mask
    stays exact). With two classes NCKD is exactly 0.

    Args:
      student_logits: [batch, num_classes] float student logits, ``num_classes >= 2``.
      teacher_logits: [batch, num_classes] float teacher logits; no gradient flows to them.
      labels: [batch] integer target class ids in ``[0, num_classes)``.
      temperature: softmax temperature ``T > 0``.
      guard_teacher: test each teacher row (default): one holding NaN or +inf, or only -inf,
        gets a NaN loss and zero gradient; one sure of the target (every other logit -inf)
        TCKD of the target alone and NCKD 0. ``False`` skips the tests (see "Bad values" in
        the module docstring).

    Returns:
      [batch] float32 per-example losses (>= 0); NaN for an example whose (traced) label is out
      of range, and for every example when a (traced) temperature is not finite and > 0.

    Examples:
      >>> import jax.numpy as jnp
      >>> from dkd_jax.losses import nckd_loss
      >>> s = jnp.array([[0.0, jnp.log(2.0), 0.0]])  # p̂^S = [2/3, 1/3]
      >>> t = jnp.array([[jnp.log(2.0), 0.0, 0.0]])  # p̂^T = [1/2, 1/2]
      >>> print(f"{float(nckd_loss(s, t, jnp.array([0]), temperature=1.0)[0]):.4f}")
      0.0589

    References:
      B. Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.
    """
    zs, zt, target, temp, ok = _prepare(
        "nckd_loss", student_logits, teacher_logits, labels, temperature, guard=guard_teacher
    )
    return _poison(temp**2 * _nckd(zs, zt, target, guard_teacher), ok)


def dkd_loss(
    student_logits,
    teacher_logits,
    labels,
    *,
    alpha=1.0,
    beta=8.0,
    temperature=4.0,
    guard_teacher=True,
) -> jax.Array:
    r"""Decoupled knowledge distillation loss, per example: ``alpha * TCKD + beta * NCKD``.

    .. math::
        \mathrm{DKD} = \alpha \, \mathrm{TCKD} + \beta \, \mathrm{NCKD}

    with TCKD and NCKD as in :func:`tckd_loss` / :func:`nckd_loss` (both include ``T**2``).
    Classical KD is the special case ``alpha = 1``, ``beta = 1 - p_t^T`` (per example, an
    identity: this function takes scalar ``alpha`` and ``beta``):
    ``KD = TCKD + (1 - p_t^T) * NCKD``. The batch mean of this function equals mdistiller's
    ``dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature)`` (to float
    precision while logit gaps over ``T`` stay well below its mask value 1000; see
    :func:`nckd_loss`). The CE term
    and the warm-up factor ``min(epoch / warmup, 1)`` belong to the training step, not here.

    Args:
      student_logits: [batch, num_classes] float student logits, ``num_classes >= 2`` (any float
        dtype; computed in float32).
      teacher_logits: [batch, num_classes] float teacher logits; no gradient flows to them.
      labels: [batch] integer target class ids in ``[0, num_classes)``.
      alpha: TCKD weight (>= 0; Python float or scalar array, may be traced).
      beta: NCKD weight (>= 0; Python float or scalar array, may be traced).
      temperature: softmax temperature ``T > 0``.
      guard_teacher: test each teacher row (default): one holding NaN or +inf, or only -inf,
        gets a NaN loss and zero gradient; one sure of the target (every other logit -inf)
        TCKD of the target alone and NCKD 0. ``False`` skips the tests (see "Bad values" in
        the module docstring).

    Returns:
      [batch] float32 per-example losses (>= 0); NaN for an example whose (traced) label is out
      of range, and for every example when a (traced) temperature is not finite and > 0 or a
      (traced) alpha / beta is not finite and >= 0.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dkd_jax.losses import dkd_loss
      >>> s = jnp.array([[0.0, jnp.log(2.0), 0.0]])
      >>> t = jnp.array([[jnp.log(2.0), 0.0, 0.0]])
      >>> y = jnp.array([0])
      >>> # alpha * TCKD + beta * NCKD = 1/2 log(4/3) + 8 * 1/2 log(9/8)
      >>> print(f"{float(dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=1.0)[0]):.4f}")
      0.6150
      >>> g = jax.grad(lambda s: dkd_loss(s, t, y, temperature=1.0).mean())(s)
      >>> g.shape
      (1, 3)

    References:
      B. Zhao, Q. Cui, R. Song, Y. Qiu, J. Liang, "Decoupled Knowledge Distillation", CVPR 2022.
      Z. Zhao et al., "Hierarchical Network with Decoupled Knowledge Distillation for Speech
      Emotion Recognition", ICASSP 2023, arXiv:2303.05134.
    """
    zs, zt, target, temp, ok = _prepare(
        "dkd_loss", student_logits, teacher_logits, labels, temperature, guard=guard_teacher
    )
    a, a_ok = _guard_scalar(
        _check_scalar("dkd_loss", "alpha", alpha, positive=False), positive=False, safe=0.0
    )
    b, b_ok = _guard_scalar(
        _check_scalar("dkd_loss", "beta", beta, positive=False), positive=False, safe=0.0
    )
    loss = temp**2 * (
        a * _tckd(zs, zt, target, guard_teacher) + b * _nckd(zs, zt, target, guard_teacher)
    )
    return _poison(loss, ok & a_ok & b_ok)


# --------------------------------------------------------------------------------------------
# Checked mode (jax.experimental.checkify)
# --------------------------------------------------------------------------------------------


def validate_labels(labels, num_classes: int) -> None:
    """Checks that every label is a class id in ``[0, num_classes)``, with ``checkify.check``.

    The losses return NaN for an example whose traced label is out of range. For a raised error
    instead, call this inside a function wrapped with ``jax.experimental.checkify.checkify``
    (inside or outside ``jax.jit``, also under ``vmap`` / ``pmap``): the returned error names the
    first bad label and its index, and ``err.throw()`` raises it. Called eagerly on concrete
    labels, a failed check raises at once. Under ``jax.jit`` *without* ``checkify``, tracing fails
    ("Cannot abstractly evaluate a checkify.check which was not functionalized").

    Args:
      labels: integer class ids of any shape (usually ``[batch]``); the index in the message is
        the position in the flattened array.
      num_classes: the number of classes (a Python int >= 1).

    Raises:
      TypeError / ValueError: non-integer labels or a bad ``num_classes`` (at trace time).
      jax.experimental.checkify.JaxRuntimeError (a ``ValueError``): a label out of range, raised
        by ``err.throw()`` (or at once when called eagerly).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax.experimental import checkify
      >>> from dkd_jax.losses import dkd_loss, validate_labels
      >>> def loss(student, teacher, labels):
      ...     validate_labels(labels, num_classes=3)
      ...     return dkd_loss(student, teacher, labels).mean()
      >>> checked = jax.jit(checkify.checkify(loss))
      >>> err, value = checked(jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.array([0, 5]))
      >>> print(err.get())  # doctest: +ELLIPSIS
      dkd_jax.losses.validate_labels: labels must lie in [0, 3), got 5 at index 1...
      >>> err, value = checked(jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.array([0, 2]))
      >>> print(err.get(), float(value))
      None 0.0
    """
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"{_WHERE}.validate_labels: labels must be integer class ids, got dtype {labels.dtype}"
        )
    try:  # any integer (np.int64 included), never a bool or a float
        count = None if isinstance(num_classes, bool) else operator.index(num_classes)
    except TypeError:
        count = None
    if count is None or count < 1:
        raise ValueError(
            f"{_WHERE}.validate_labels: num_classes must be an int >= 1, got {num_classes!r}"
        )
    if labels.size == 0:
        return
    flat = labels.reshape(-1)
    ok = _in_range(flat, count)
    first_bad = jnp.argmin(ok)  # index of the first False (0 when all are True: unused)
    checkify.check(
        jnp.all(ok),
        f"{_WHERE}.validate_labels: labels must lie in [0, {num_classes}), "
        "got {label} at index {index}",
        label=flat[first_bad],
        index=first_bad,
    )


def validate_temperature(temperature) -> None:
    """Checks that a (possibly traced) temperature is finite and > 0, with ``checkify.check``.

    The losses return NaN for every example when a traced temperature is not finite and > 0
    (concrete ones raise ``ValueError`` at once). Use this like :func:`validate_labels`, inside a
    function wrapped with ``jax.experimental.checkify.checkify``, for a raised error instead.

    Args:
      temperature: a scalar (Python number or array, may be traced).

    Raises:
      TypeError / ValueError: a non-scalar or non-real temperature (at trace time).
      jax.experimental.checkify.JaxRuntimeError (a ``ValueError``): not finite and > 0, raised by
        ``err.throw()`` (or at once when called eagerly).
    """
    if isinstance(temperature, bool):
        raise TypeError(
            f"{_WHERE}.validate_temperature: temperature must be a number, got {temperature!r}"
        )
    t = jnp.asarray(temperature)
    if t.ndim != 0:
        raise ValueError(
            f"{_WHERE}.validate_temperature: temperature must be a scalar, got shape {t.shape}"
        )
    if not (jnp.issubdtype(t.dtype, jnp.floating) or jnp.issubdtype(t.dtype, jnp.integer)):
        raise TypeError(
            f"{_WHERE}.validate_temperature: temperature must be a real number, got dtype {t.dtype}"
        )
    t = t.astype(jnp.float32)
    checkify.check(
        jnp.isfinite(t) & (t > 0),
        f"{_WHERE}.validate_temperature: temperature must be finite and > 0, got {{t}}",
        t=t,
    )
