"""The training objective: loss weights per objective, the per-example terms, augmentation.

A teacher trains on cross-entropy. A student minimises, per segment,

    ce_weight * CE + min(epoch / warmup_epochs, 1) * D,   D = alpha*TCKD + beta*NCKD   (dkd)
                                                            kd_weight*KD                (kd)
                                                            alpha*TCKD                  (tckd)
                                                            beta*NCKD                   (nckd)
                                                            (ce: plain CE, no teacher)

with ``epoch`` counted from 1 (mdistiller). With mixup the label-dependent terms are mixed
``lam * L(y_a) + (1 - lam) * L(y_b)``. The weights are a runtime argument of the compiled step
(:func:`loss_weights`), so the dkd, kd, tckd and nckd students of one architecture share one
compilation. The numerics of each term live in ``dkd_jax.losses``.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dkd_jax import config as config_lib
from dkd_jax import losses

__all__ = ["augment_batch", "kd_ramp", "loss_terms", "loss_weights", "objective"]


# Which ``KDConfig`` field weighs each distillation term, per student objective ("ce": none);
# every distillation objective also reads _DISTILL_FIELDS. One table for loss_weights (what
# the step computes) and unused_settings (what an override can change).
_TERM_WEIGHTS = {
    "dkd": {"tckd": "alpha", "nckd": "beta"},
    "kd": {"kd": "kd_weight"},
    "tckd": {"tckd": "alpha"},
    "nckd": {"nckd": "beta"},
    "ce": {},
}
_DISTILL_FIELDS = ("temperature", "warmup_epochs", "ce_weight")


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
        if loss not in _TERM_WEIGHTS:
            raise ValueError(f"unknown loss {loss!r}")
        w["ce"] = kd.ce_weight
        for term, field in _TERM_WEIGHTS[loss].items():
            w[term] = getattr(kd, field)
    w["temperature"] = kd.temperature
    w["warmup_epochs"] = kd.warmup_epochs if role == "student" else 0.0
    return {k: np.float32(v) for k, v in w.items()}


def unused_settings(fields: Iterable[str], *, role: str, loss: str) -> list[str]:
    """The config fields (``"kd.beta"``, ``"model.teacher.attention_heads"``) among ``fields``
    that the run never reads: the distillation weights its objective does not use (as
    :func:`loss_weights` reads them; every ``kd`` field but the loss for a teacher or a CE
    student), and the architecture of the network it does not train (a student's teacher comes
    from the teacher's own run)."""
    used: tuple[str, ...] = ()
    if role == "student" and _TERM_WEIGHTS.get(loss):
        used = (*_TERM_WEIGHTS[loss].values(), *_DISTILL_FIELDS)
    other_arch = "model.teacher." if role == "student" else "model.student."
    out = []
    for field in fields:
        if field.startswith("kd.") and field != "kd.loss" and field[3:] not in used:
            out.append(field)
        elif field.startswith(other_arch):
            out.append(field)
    return out


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

    # guard_teacher=False: the teacher's logits are a trained network's (precomputed ones are
    # checked finite when the run starts; a NaN from a live teacher makes the loss NaN, which
    # stops the run), and the per-row teacher tests would change the compiled step's bits.
    kw = {"temperature": temperature, "guard_teacher": False}
    terms = {"ce": mixed(lambda y: losses.cross_entropy(logits, y))}
    if teacher_logits is not None:
        terms["tckd"] = mixed(lambda y: losses.tckd_loss(logits, teacher_logits, y, **kw))
        terms["nckd"] = mixed(lambda y: losses.nckd_loss(logits, teacher_logits, y, **kw))
        terms["kd"] = losses.kd_loss(logits, teacher_logits, **kw)
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
