"""Tests for dkd_jax.losses: NumPy float64 oracles, hand-computed cases, identities, gradients,
extreme logits, bfloat16, jit tracing, vmap and pmap on the 2 forced CPU devices, traced bad
labels / temperatures (NaN confined to the bad example) and the checkify checked mode."""

from __future__ import annotations

import doctest
import functools
import math
import platform
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.test_util import check_grads
from scipy.special import logsumexp

from dkd_jax import losses

# The tests exercise the jitted functions, as production runs them. Hyperparameters are traced
# (one compilation per shape); eager-only behaviour (label value checks that raise) is tested via
# `losses.*`; traced bad values (NaN results) at the end of this file.
cross_entropy = jax.jit(losses.cross_entropy)
kd_loss = jax.jit(losses.kd_loss)
tckd_loss = jax.jit(losses.tckd_loss)
nckd_loss = jax.jit(losses.nckd_loss)
dkd_loss = jax.jit(losses.dkd_loss)

# Explicit tolerances (float32 computation vs float64 oracle).
RTOL = 1e-5
ATOL = 2e-6  # multiplied by T**2 where the loss carries the T**2 factor


# --------------------------------------------------------------------------------------------
# Independent NumPy float64 references
# --------------------------------------------------------------------------------------------


def _np_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def _np_log_softmax(x):
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def _np_kl_sum(target, log_input):
    """torch.nn.functional.kl_div(log_input, target, reduction='sum') per row (0 log 0 = 0)."""
    safe = np.where(target > 0, target, 1.0)
    return np.where(target > 0, target * (np.log(safe) - log_input), 0.0).sum(axis=1)


def mdistiller_dkd_mean(zs, zt, y, alpha, beta, T):
    """Literal float64 transcription of mdistiller's dkd_loss (paper_spec.md §3): batch mean."""
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
    n, c = zs.shape
    gt = np.zeros((n, c))
    gt[np.arange(n), y] = 1.0
    other = 1.0 - gt
    ps, pt = _np_softmax(zs / T), _np_softmax(zt / T)
    # cat_mask: [target mass, non-target mass]
    bs = np.stack([(ps * gt).sum(1), (ps * other).sum(1)], axis=1)
    bt = np.stack([(pt * gt).sum(1), (pt * other).sum(1)], axis=1)
    tckd = _np_kl_sum(bt, np.log(bs)).sum() * T**2 / n
    pt2 = _np_softmax(zt / T - 1000.0 * gt)
    log_ps2 = _np_log_softmax(zs / T - 1000.0 * gt)
    nckd = _np_kl_sum(pt2, log_ps2).sum() * T**2 / n
    return alpha * tckd + beta * nckd


def ref_terms(zs, zt, y, T):
    """Per-example (KD, TCKD, NCKD, p_t^teacher) straight from the definitions, float64."""
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
    n, c = zs.shape
    ps, pt = _np_softmax(zs / T), _np_softmax(zt / T)
    kd = T**2 * (pt * (np.log(pt) - np.log(ps))).sum(1)
    tckd, nckd = np.zeros(n), np.zeros(n)
    for i in range(n):
        t = y[i]
        bs = np.array([ps[i, t], 1 - ps[i, t]])
        bt = np.array([pt[i, t], 1 - pt[i, t]])
        tckd[i] = T**2 * (bt * np.log(bt / bs)).sum()
        rest = [j for j in range(c) if j != t]
        hs = ps[i, rest] / ps[i, rest].sum()
        ht = pt[i, rest] / pt[i, rest].sum()
        nckd[i] = T**2 * (ht * np.log(ht / hs)).sum()
    return kd, tckd, nckd, pt[np.arange(n), y]


def ref_terms_logspace(zs, zt, y, T):
    """(KD, TCKD, NCKD) per example in float64 log space via scipy's logsumexp (extreme logits)."""
    zs, zt = np.asarray(zs, np.float64) / T, np.asarray(zt, np.float64) / T
    out = np.zeros((3, zs.shape[0]))
    for i, t in enumerate(y):
        rest = np.arange(zs.shape[1]) != t
        lp_s, lp_t = zs[i] - logsumexp(zs[i]), zt[i] - logsumexp(zt[i])
        lb_s = np.array([lp_s[t], logsumexp(lp_s[rest])])
        lb_t = np.array([lp_t[t], logsumexp(lp_t[rest])])
        lh_s, lh_t = zs[i, rest] - logsumexp(zs[i, rest]), zt[i, rest] - logsumexp(zt[i, rest])
        for k, (a, b) in enumerate([(lp_t, lp_s), (lb_t, lb_s), (lh_t, lh_s)]):
            out[k, i] = T**2 * np.sum(np.exp(a) * (a - b))
    return out


def _random_case(seed, batch, num_classes, scale=3.0):
    rng = np.random.default_rng(seed)
    zs = (scale * rng.standard_normal((batch, num_classes))).astype(np.float32)
    zt = (scale * rng.standard_normal((batch, num_classes))).astype(np.float32)
    y = rng.integers(0, num_classes, size=batch).astype(np.int32)
    return zs, zt, y


# --------------------------------------------------------------------------------------------
# Against the references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 4, 7])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("alpha,beta", [(1.0, 8.0), (1.0, 1.0), (0.5, 2.0), (0.0, 6.0)])
def test_dkd_batch_mean_matches_mdistiller(num_classes, T, alpha, beta):
    zs, zt, y = _random_case(num_classes * 100 + int(T), 16, num_classes)
    got = dkd_loss(zs, zt, y, alpha=alpha, beta=beta, temperature=T)
    assert got.shape == (16,) and got.dtype == jnp.float32
    want = mdistiller_dkd_mean(zs, zt, y, alpha, beta, T)
    np.testing.assert_allclose(float(got.mean()), want, rtol=RTOL, atol=ATOL * T**2)


@pytest.mark.parametrize("num_classes", [2, 4, 7])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_per_example_terms_match_definitions(num_classes, T):
    zs, zt, y = _random_case(7 * num_classes + int(T), 12, num_classes)
    kd, tckd, nckd, _ = ref_terms(zs, zt, y, T)
    tol = dict(rtol=RTOL, atol=ATOL * T**2)
    np.testing.assert_allclose(kd_loss(zs, zt, temperature=T), kd, **tol)
    np.testing.assert_allclose(tckd_loss(zs, zt, y, temperature=T), tckd, **tol)
    np.testing.assert_allclose(nckd_loss(zs, zt, y, temperature=T), nckd, **tol)
    np.testing.assert_allclose(
        dkd_loss(zs, zt, y, alpha=0.3, beta=2.5, temperature=T), 0.3 * tckd + 2.5 * nckd, **tol
    )


def test_cross_entropy_matches_numpy():
    zs, _, y = _random_case(3, 10, 5)
    want = -_np_log_softmax(zs.astype(np.float64))[np.arange(10), y]
    np.testing.assert_allclose(cross_entropy(zs, y), want, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------
# Hand-computed small cases
# --------------------------------------------------------------------------------------------

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_hand_two_classes():
    # p^T = [3/4, 1/4], p^S = [1/2, 1/2], target 0, T = 1.
    s, t, y = np.array([[0.0, 0.0]]), np.array([[LN3, 0.0]]), np.array([0])
    kd = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.1308120
    assert abs(kd - 0.1308120) < 1e-6
    np.testing.assert_allclose(kd_loss(s, t, temperature=1.0), [kd], rtol=1e-6)
    np.testing.assert_allclose(tckd_loss(s, t, y, temperature=1.0), [kd], rtol=1e-6)
    # NCKD over a single non-target class is exactly zero.
    assert float(nckd_loss(s, t, y, temperature=1.0)[0]) == 0.0
    np.testing.assert_allclose(dkd_loss(s, t, y, temperature=1.0), [kd], rtol=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_hand_three_classes(T):
    # At temperature T the logits are scaled by T so that p = softmax(z / T) is always
    # p^T = [1/2, 1/4, 1/4], p^S = [1/4, 1/2, 1/4]; target 0.
    s = T * np.array([[0.0, LN2, 0.0]])
    t = T * np.array([[LN2, 0.0, 0.0]])
    y = np.array([0])
    kd = 0.5 * math.log(2.0) + 0.25 * math.log(0.5) + 0.25 * math.log(1.0)  # = ln2 / 4
    tckd = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # = ln(4/3) / 2 = 0.1438410
    nckd = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))  # = ln(9/8) / 2
    assert abs(tckd - 0.1438410) < 1e-6 and abs(nckd - 0.0588915) < 1e-6
    t2 = T**2
    np.testing.assert_allclose(kd_loss(s, t, temperature=T), [t2 * kd], rtol=1e-6)
    np.testing.assert_allclose(tckd_loss(s, t, y, temperature=T), [t2 * tckd], rtol=1e-6)
    np.testing.assert_allclose(nckd_loss(s, t, y, temperature=T), [t2 * nckd], rtol=1e-5)
    np.testing.assert_allclose(
        dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=T),
        [t2 * (tckd + 8.0 * nckd)],
        rtol=1e-6,
    )
    # KD = TCKD + (1 - p_t^T) NCKD with p_t^T = 1/2.
    assert abs(kd - (tckd + 0.5 * nckd)) < 1e-12


def test_hand_cross_entropy():
    logits = np.array([[0.0, LN3], [LN2, 0.0]])  # softmax rows [1/4, 3/4], [2/3, 1/3]
    np.testing.assert_allclose(
        cross_entropy(logits, np.array([1, 1])), [-math.log(0.75), -math.log(1 / 3)], rtol=1e-6
    )


def test_docstring_examples_run():
    result = doctest.testmod(losses, raise_on_error=False)
    assert result.attempted >= 10 and result.failed == 0


# --------------------------------------------------------------------------------------------
# Identities and properties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 4, 7])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_decomposition_identity(num_classes, T):
    # T^2 KL(p^T||p^S) = T^2 KL(b^T||b^S) + (1 - p_t^T) T^2 KL(p̂^T||p̂^S): T^2 on every term.
    zs, zt, y = _random_case(11 * num_classes, 32, num_classes)
    pt_teacher = np.asarray(jax.nn.softmax(jnp.asarray(zt) / T))[np.arange(32), y]
    kd = kd_loss(zs, zt, temperature=T)
    rhs = tckd_loss(zs, zt, y, temperature=T) + (1 - pt_teacher) * nckd_loss(
        zs, zt, y, temperature=T
    )
    np.testing.assert_allclose(kd, rhs, rtol=RTOL, atol=ATOL * T**2)
    # DKD with alpha = 1 and a per-example beta = 1 - p_t^T is classical KD.
    np.testing.assert_allclose(
        dkd_loss(zs, zt, y, alpha=1.0, beta=1.0, temperature=T)
        - nckd_loss(zs, zt, y, temperature=T) * pt_teacher,
        kd,
        rtol=RTOL,
        atol=ATOL * T**2,
    )


def test_student_equals_teacher_gives_zero():
    zs, _, y = _random_case(5, 8, 4)
    for fn in (tckd_loss, nckd_loss, dkd_loss):
        np.testing.assert_allclose(fn(zs, zs, y), 0.0, atol=1e-5)
    np.testing.assert_allclose(kd_loss(zs, zs), 0.0, atol=1e-5)


def test_zero_weights_give_zero():
    zs, zt, y = _random_case(6, 8, 4)
    out = dkd_loss(zs, zt, y, alpha=0.0, beta=0.0)
    assert np.all(np.asarray(out) == 0.0)


def test_losses_are_nonnegative():
    for seed, c in [(0, 2), (1, 4), (2, 7)]:
        zs, zt, y = _random_case(seed, 64, c, scale=8.0)
        for fn in (tckd_loss, nckd_loss, dkd_loss):
            assert np.all(np.asarray(fn(zs, zt, y)) >= -1e-5)
        assert np.all(np.asarray(kd_loss(zs, zt)) >= -1e-5)
        assert np.all(np.asarray(cross_entropy(zs, y)) >= 0.0)


def test_bfloat16_inputs_are_computed_in_float32():
    zs, zt, y = _random_case(9, 16, 4)
    zs_b, zt_b = jnp.asarray(zs, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16)
    out_b = dkd_loss(zs_b, zt_b, y)
    assert out_b.dtype == jnp.float32
    # Exactly the float32 computation on the bf16-rounded logits ...
    out_rounded = dkd_loss(np.asarray(zs_b, np.float32), np.asarray(zt_b, np.float32), y)
    np.testing.assert_allclose(out_b, out_rounded, rtol=1e-6, atol=1e-6)
    # ... and close to the float32 result on the unrounded logits (bf16 keeps ~3 digits).
    np.testing.assert_allclose(out_b, dkd_loss(zs, zt, y), rtol=5e-2, atol=5e-2)
    assert kd_loss(zs_b, zt_b).dtype == jnp.float32
    assert cross_entropy(zs_b, y).dtype == jnp.float32


def test_vmap_matches_loop():
    zs = np.stack([_random_case(k, 6, 4)[0] for k in range(3)])
    zt = np.stack([_random_case(k, 6, 4)[1] for k in range(3)])
    y = np.stack([_random_case(k, 6, 4)[2] for k in range(3)])
    got = jax.vmap(lambda a, b, c: dkd_loss(a, b, c, beta=2.0))(zs, zt, y)
    want = np.stack([dkd_loss(zs[k], zt[k], y[k], beta=2.0) for k in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_traced_hyperparameters():
    # alpha / beta / temperature may be traced scalars (e.g. a warm-up ramp inside jit).
    zs, zt, y = _random_case(12, 8, 4)
    f = jax.jit(lambda a, b, T: losses.dkd_loss(zs, zt, y, alpha=a, beta=b, temperature=T))
    np.testing.assert_allclose(
        f(0.5, 3.0, 2.0), dkd_loss(zs, zt, y, alpha=0.5, beta=3.0, temperature=2.0), rtol=1e-6
    )


# --------------------------------------------------------------------------------------------
# Extreme logits and gradients
# --------------------------------------------------------------------------------------------


def _extreme_case():
    rng = np.random.default_rng(0)
    n, c = 16, 4
    zs = (1e4 * rng.choice([-1.0, 1.0], size=(n, c))).astype(np.float32)
    zs[:4] = rng.standard_normal((4, c))  # some moderate students too
    y = rng.integers(0, c, size=n).astype(np.int32)
    zt = np.full((n, c), -1e4, np.float32)
    hot = rng.integers(0, c, size=n)
    zt[np.arange(n), hot] = 1e4  # one-hot-like teacher, sometimes on the wrong class
    zt[:2] = 1e4  # ties at the extreme
    return zs, zt, y


def _all_losses(zs, zt, y, T=4.0):
    return {
        "kd": lambda s, t: kd_loss(s, t, temperature=T),
        "tckd": lambda s, t: tckd_loss(s, t, y, temperature=T),
        "nckd": lambda s, t: nckd_loss(s, t, y, temperature=T),
        "dkd": lambda s, t: dkd_loss(s, t, y, temperature=T),
    }


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_extreme_logits_finite_values_and_grads(T):
    zs, zt, y = _extreme_case()
    for name, fn in _all_losses(zs, zt, y, T).items():
        val = jax.jit(fn)(zs, zt)
        assert np.all(np.isfinite(val)), name
        assert np.all(np.asarray(val) >= -1e-3 * T**2), name
        gs, gt = jax.jit(jax.grad(lambda s, t, fn=fn: fn(s, t).mean(), argnums=(0, 1)))(zs, zt)
        assert np.all(np.isfinite(gs)), name
        assert np.all(np.asarray(gt) == 0.0), name  # the teacher receives no gradient
    ce_grad = jax.grad(lambda s: cross_entropy(s, y).mean())(zs)
    assert np.all(np.isfinite(cross_entropy(zs, y))) and np.all(np.isfinite(ce_grad))


def test_extreme_values_against_oracle():
    # Moderately extreme (|z/T| up to 150): float64 oracle is still exact; check the values.
    rng = np.random.default_rng(1)
    zs = (600.0 * rng.standard_normal((8, 4))).astype(np.float32)
    zt = (600.0 * rng.standard_normal((8, 4))).astype(np.float32)
    y = rng.integers(0, 4, size=8)
    kd, tckd, nckd = ref_terms_logspace(zs, zt, y, 4.0)
    np.testing.assert_allclose(kd_loss(zs, zt), kd, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(tckd_loss(zs, zt, y), tckd, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(nckd_loss(zs, zt, y), nckd, rtol=1e-4, atol=1e-2)


def test_two_class_nckd_is_exactly_zero_even_when_extreme():
    zs = np.array([[1e4, -1e4], [-1e4, 1e4], [3.0, -2.0]], np.float32)
    zt = np.array([[-1e4, 1e4], [1e4, -1e4], [1e4, 1e4]], np.float32)
    y = np.array([0, 0, 1])
    assert np.all(np.asarray(nckd_loss(zs, zt, y)) == 0.0)
    g = jax.grad(lambda s: nckd_loss(s, zt, y).sum())(zs)
    assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_check_grads_student(num_classes):
    zs, zt, y = _random_case(21 + num_classes, 4, num_classes, scale=1.0)
    tol = dict(order=1, modes=("rev",), atol=1e-2, rtol=1e-2, eps=1e-2)
    for fn in _all_losses(zs, zt, y, 2.0).values():
        check_grads(lambda s, fn=fn: fn(s, zt), (zs,), **tol)
    check_grads(lambda s: cross_entropy(s, y), (zs,), **tol)


def test_grad_matches_analytic_kd_gradient():
    # d/dz_s of T^2 KL(p^T||p^S) = T (p^S - p^T): an exact closed form to compare with.
    zs, zt, _ = _random_case(30, 5, 4)
    T = 4.0
    g = jax.grad(lambda s: kd_loss(s, zt, temperature=T).sum())(zs)
    want = T * (_np_softmax(zs.astype(np.float64) / T) - _np_softmax(zt.astype(np.float64) / T))
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# jit tracing and pmap
# --------------------------------------------------------------------------------------------


def test_jit_traces_once_per_shape():
    traces = []

    def wrapped(s, t, y):
        traces.append(s.shape)  # Python side effect: runs only while tracing
        return losses.dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=4.0).mean()

    f = jax.jit(wrapped)
    a = _random_case(1, 8, 4)
    b = _random_case(2, 8, 4)
    f(*a).block_until_ready()
    f(*b).block_until_ready()
    assert len(traces) == 1
    f(*_random_case(3, 6, 4)).block_until_ready()
    assert len(traces) == 2
    f(*a).block_until_ready()
    assert len(traces) == 2


def test_pmap_matches_single_device():
    n_dev = jax.local_device_count()
    assert n_dev == 2, "tests/conftest.py forces 2 CPU devices"
    rng = np.random.default_rng(4)
    batch, feat, c = 8, 5, 4
    x = rng.standard_normal((batch, feat)).astype(np.float32)
    w = (0.5 * rng.standard_normal((feat, c))).astype(np.float32)
    zt = (3.0 * rng.standard_normal((batch, c))).astype(np.float32)
    y = rng.integers(0, c, size=batch).astype(np.int32)

    def mean_loss(w, x, zt, y):
        return dkd_loss(x @ w, zt, y, alpha=1.0, beta=8.0, temperature=4.0).mean()

    single_loss, single_grad = jax.jit(jax.value_and_grad(mean_loss))(w, x, zt, y)

    def step(w, x, zt, y):
        loss, grad = jax.value_and_grad(mean_loss)(w, x, zt, y)
        return jax.lax.pmean(loss, "d"), jax.lax.pmean(grad, "d")

    def shard(a):
        return a.reshape((n_dev, batch // n_dev, *a.shape[1:]))

    w_rep = np.broadcast_to(w, (n_dev, *w.shape))
    p_loss, p_grad = jax.pmap(step, axis_name="d")(w_rep, shard(x), shard(zt), shard(y))
    p_loss, p_grad = jax.block_until_ready((p_loss, p_grad))
    np.testing.assert_allclose(p_loss, np.full(n_dev, float(single_loss)), rtol=1e-5)
    for d in range(n_dev):
        np.testing.assert_allclose(p_grad[d], single_grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    zs, zt, y = _random_case(0, 4, 3)
    cases = [
        (
            ValueError,
            "dkd_loss: student_logits must have shape",
            losses.dkd_loss,
            (zs[0], zt, y),
            {},
        ),
        (ValueError, "same shape", losses.dkd_loss, (zs, zt[:, :2], y), {}),
        (TypeError, "floating-point", losses.dkd_loss, (zs.astype(np.int32), zt, y), {}),
        (TypeError, "integer class ids", losses.tckd_loss, (zs, zt, y.astype(np.float32)), {}),
        (ValueError, r"labels must have shape \[batch\]", losses.nckd_loss, (zs, zt, y[:3]), {}),
        (ValueError, r"labels must lie in \[0, 3\)", losses.dkd_loss, (zs, zt, y + 1), {}),
        (ValueError, r"labels must lie in \[0, 3\)", losses.cross_entropy, (zs, y - 1), {}),
        (ValueError, "at least 2 classes", losses.dkd_loss, (zs[:, :1], zt[:, :1], y * 0), {}),
        (
            ValueError,
            "temperature must be finite and > 0",
            losses.kd_loss,
            (zs, zt),
            {"temperature": 0.0},
        ),
        (
            ValueError,
            "temperature must be finite and > 0",
            losses.nckd_loss,
            (zs, zt, y),
            {"temperature": float("nan")},
        ),
        (ValueError, "beta must be finite and >= 0", losses.dkd_loss, (zs, zt, y), {"beta": -1.0}),
        (ValueError, "alpha must be a scalar", losses.dkd_loss, (zs, zt, y), {"alpha": np.ones(2)}),
        (
            TypeError,
            "temperature must be a number",
            losses.kd_loss,
            (zs, zt),
            {"temperature": True},
        ),
    ]
    for exc, pattern, fn, args, kwargs in cases:
        with pytest.raises(exc, match=pattern):
            fn(*args, **kwargs)
    # Shape errors surface at trace time under jit too.
    with pytest.raises(ValueError, match=r"dkd_jax\.losses\.dkd_loss: .*same shape"):
        dkd_loss(zs, zt[:, :2], y)


def test_concrete_labels_captured_under_jit():
    """Labels closed over by a jitted function are concrete; validation must not trace them."""
    labels = jnp.array([0, 3, 1])
    teacher = jnp.zeros((3, 4))

    @jax.jit
    def f(student):
        return losses.dkd_loss(student, teacher, labels)

    out = f(jnp.ones((3, 4)))
    np.testing.assert_allclose(np.asarray(out), 0.0, atol=1e-6)


def test_numpy_constants_closed_over_under_jit_are_checked_too():
    # Before: jnp.asarray of a NumPy constant inside the trace was a tracer, so these gave NaN.
    student, teacher = jnp.ones((4, 11)), jnp.zeros((4, 11))
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0, got 0\.0"):
        jax.jit(lambda a: losses.dkd_loss(a, teacher, [0, 1, 2, 3], temperature=np.float32(0)))(
            student
        )
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 11\), got values in \[0, 11\]"):
        jax.jit(lambda a: losses.dkd_loss(a, teacher, np.array([0, 3, 5, 11])))(student)


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            {"temperature": 1e-50},
            r"temperature must be finite and > 0, got 1e-50 \(0.0 in float32\)",
        ),
        ({"temperature": 1e40}, r"temperature must be finite and > 0, got 1e\+40 \(inf in float32"),
        ({"alpha": 1e40}, r"alpha must be finite and >= 0, got 1e\+40 \(inf in float32"),
    ],
)
def test_values_that_float32_cannot_hold_are_refused(kw, message):
    # Before: accepted in float64, then 0 or inf in the float32 loss: every example NaN.
    zs, zt, y = _random_case(3, 4, 5)
    with pytest.raises(ValueError, match=message):
        losses.dkd_loss(zs, zt, y, **kw)


def test_temperatures_beyond_float32_accuracy_warn_and_the_documented_accuracy_holds():
    rng = np.random.default_rng(0)
    zs = (3 * rng.normal(size=(64, 4))).astype(np.float32)
    zt = (3 * rng.normal(size=(64, 4))).astype(np.float32)
    y = rng.integers(0, 4, 64)
    worst = {}
    for T in (4.0, 100.0, 1000.0):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = np.asarray(losses.dkd_loss(zs, zt, y, alpha=1.0, beta=8.0, temperature=T))
        assert bool(caught) == (T > losses.MAX_ACCURATE_TEMPERATURE)
        _, tckd, nckd = ref_terms_logspace(zs, zt, y, T)
        worst[T] = np.max(np.abs(got - (tckd + 8 * nckd)) / (tckd + 8 * nckd))
    assert "temperature=1000 is above 100" in str(caught[0].message)
    assert caught[0].filename == __file__  # the warning points at the caller
    # the module docstring's figures: 6e-6 at T = 4, 3e-3 at 100, 0.2 at 1e3 (x2 margin)
    assert worst[4.0] < 1.2e-5 and worst[100.0] < 7e-3 and 0.05 < worst[1000.0] < 0.5


# --------------------------------------------------------------------------------------------
# Traced bad values: NaN confined to the bad example; checked mode with checkify
# --------------------------------------------------------------------------------------------

# Float32 bit patterns (hex) of the per-example values and d(mean)/d(student logits) that the
# implementation *before* traced bad values became NaN (commit aa2f5a3) computed, with every
# argument traced under jit (T = 2, alpha 0.7, beta 3), on XLA:CPU x86-64 with jax 0.10.2.
# Keys are _random_case(seed, batch, num_classes, scale) arguments. The NaN guard must not move
# a single bit of a valid result (training runs must reproduce).
_PREVIOUS_BITS = {
    (14, 6, 4, 3.0): {
        "ce": "412de7fe 4071d227 4129c618 40fc127b 40f03fdf 407fc920",
        "grad_ce": (
            "3e295cf5 3a8e76f2 393fce72 be2aa9d6 3a9cb4f1 3e1522f0 be26c3fc 3c833d10 3aa38933 "
            "be2aa997 3e29616c 368c049e 391045c6 3e2a6dae 3805906e be2a9a19 3c3e5c27 3e16bd0c "
            "be2a92b1 3bfdfc3e 3e2519cd 3af738ba 39ff0942 be2787c3"
        ),
        "kd": "408a8653 4091a504 418b311d 411313d3 403df8f2 409a861b",
        "grad_kd": (
            "3e3f4248 bd50416b be0775be bb6f0c32 bdc557bd 3e45c291 bdf6ca9b 3cc274e2 3c61ae7d "
            "bd491fe2 3e95388d be832205 bc315282 3e751ce4 39ecb5c4 be6a7e1a 3d327997 3ba314c0 "
            "bdbeb5e9 3d368fa5 3e5a0018 3c821e4b bd105fc4 be462bf4"
        ),
        "tckd": "3d125c33 3fd9aa96 3fcb4aef 410e0805 401f5a07 40745288",
        "grad_tckd": (
            "3b568580 398b1f7c 38e44b05 bb6f0c32 3bfb8bad 3dad8524 bdf6ca9b 3ce632f4 3b7ff760 "
            "bd491fe1 3d383390 396cd8e1 3bceefee 3e60ea28 3b471c01 be6a7e1a 3c8de440 3d7c8760 "
            "bdbeb5e9 3c67c95c 3e2a625c 3c936dd5 3c15bdb1 be462bf4"
        ),
        "nckd": "408b7409 40aa1463 419521c8 3f890066 3f2de1cc 404e7aa0",
        "grad_nckd": (
            "3e3ebdb2 bd547fef be099db9 00000000 be469c9a 3e4ef0f3 00000000 bc0545a0 3c3ea38c "
            "00000000 3e94ca25 be9abf41 bd6e3b8c 3d89183c bc0fd3bc 00000000 3d18a71e bda4c7c6 "
            "00000000 3d30e866 3e17e640 bbdce3d4 be10ff23 00000000"
        ),
        "dkd": "41519482 41891527 4264251c 4116cc2a 4071f52b 41459d9d",
        "grad_dkd": (
            "3f0fa470 be1f2f42 bece6299 bb275556 bf139549 3f2a6390 bdacc106 bb9b12d0 3d1a2d7a "
            "bd0cc984 3f673e44 bf681484 be2e25ce 3eb58a87 bcc6518d be242512 3dfdcf6a be4afa5f "
            "bd857f56 3e0ed24e 3f0fbde7 bbf9de4f bed63828 be0ab85d"
        ),
    },
    (15, 5, 7, 300.0): {
        "ce": "4428d06a 4449bae3 00000000 43b9c718 00000000",
        "grad_ce": (
            "00000000 00000000 00000000 00000000 0157ac87 3e4ccccd be4ccccd 00000000 be4ccccd "
            "3e4ccccd 00000000 00000000 00000000 00000000 00000000 04782472 00000000 00000000 "
            "00000000 00000000 00000000 00000000 be4ccccd 00000000 3e4ccccd 00000000 00000000 "
            "00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000"
        ),
        "kd": "4482ca54 444ccf36 4489e065 44a938cf 445b3798",
        "grad_kd": (
            "00000000 becccccd 12150f26 00000000 20522aaa 3ecccccd 00000000 00000000 00000000 "
            "3ecccccd becccccd 00000000 00000000 00000000 00000000 b65b74a3 00000000 3ecccc76 "
            "991894e7 becccc00 b4835a92 b6c41f3d 00000000 00000000 3eccccc4 00000000 00000000 "
            "becccc00 00000000 00000000 3ecccccd becccccd 00000000 1f18001b 138ff7f2"
        ),
        "tckd": "00000000 00000000 43206d1c 00000000 432fdd9e",
        "grad_tckd": (
            "00000000 00000000 8582453a 00000000 93476ef0 00000000 00000000 00000000 00000000 "
            "00000000 00000000 00000000 00000000 00000000 00000000 becccccd 00000000 3ecccccd "
            "00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 "
            "00000000 00000000 00000000 3ecccccd 00000000 86b384e3 becccccb b341fa65"
        ),
        "nckd": "4482ca54 444ccf36 446ba594 44a938cf 442f4031",
        "grad_nckd": (
            "00000000 becccccd 12150f26 00000000 20522aaa 3ecccccd 00000000 00000000 00000000 "
            "3ecccccd becccccd 00000000 00000000 00000000 00000000 3ecccc08 00000000 00000000 "
            "991894e7 becccc00 b4835a92 b6c41f3d 00000000 00000000 3eccccc4 00000000 00000000 "
            "becccc00 00000000 00000000 00000000 becccccd 06b384e3 3ecccccb 3341fa65"
        ),
        "dkd": "45442f7e 45199b68 4537c0f5 457dd536 450b21d7",
        "grad_dkd": (
            "00000000 bf99999a 12df96ba 00000000 211da000 3f99999a 00000000 00000000 00000000 "
            "3f99999a bf99999a 00000000 00000000 00000000 00000000 3f6b83f8 00000000 3e8f5c29 "
            "99e4df5a bf999900 b54507db b793176e 00000000 00000000 3f999993 00000000 00000000 "
            "bf999900 00000000 00000000 3e8f5c29 bf99999a 074e726d 3f6b851e 33df132a"
        ),
    },
}


def _traced_fns(**kw):
    """name -> f(student, teacher, labels, T), every argument traced when jitted (``kw``:
    further keywords of the distillation losses)."""
    return {
        "ce": lambda s, t, y, T: losses.cross_entropy(s, y),
        "kd": lambda s, t, y, T: losses.kd_loss(s, t, temperature=T, **kw),
        "tckd": lambda s, t, y, T: losses.tckd_loss(s, t, y, temperature=T, **kw),
        "nckd": lambda s, t, y, T: losses.nckd_loss(s, t, y, temperature=T, **kw),
        "dkd": lambda s, t, y, T: losses.dkd_loss(
            s, t, y, alpha=0.7, beta=3.0, temperature=T, **kw
        ),
    }


def _hex(x) -> str:
    return " ".join(f"{u:08x}" for u in np.asarray(x, np.float32).ravel().view(np.uint32))


@pytest.mark.skipif(
    jax.__version__ != "0.10.2" or platform.machine().lower() not in ("x86_64", "amd64"),
    reason="bit patterns recorded with jax 0.10.2 on XLA:CPU x86-64",
)
@pytest.mark.parametrize("case", sorted(_PREVIOUS_BITS))
def test_in_range_results_are_bit_identical_to_the_previous_implementation(case):
    seed, batch, num_classes, scale = case
    zs, zt, y = _random_case(seed, batch, num_classes, scale=scale)
    # With and without the teacher row tests (False: the training step's). With the tests, a
    # program that closes over T may fuse otherwise and move ~1 ulp (documented); the
    # training step's setting is what runs made before must reproduce with.
    for guard in (True, False):
        for name, f in _traced_fns(guard_teacher=guard).items():
            value = jax.jit(f)(zs, zt, y, 2.0)
            grad = jax.jit(jax.grad(lambda *a, f=f: f(*a).mean()))(zs, zt, y, 2.0)
            assert _hex(value) == _PREVIOUS_BITS[case][name], (name, guard)
            assert _hex(grad) == _PREVIOUS_BITS[case]["grad_" + name], (name, guard)


LABEL_FNS = ("ce", "tckd", "nckd", "dkd")
BAD_LABELS = [4, 7, -1, np.iinfo(np.int32).max, np.iinfo(np.int32).min]


@pytest.mark.parametrize("bad", BAD_LABELS)
def test_traced_out_of_range_label_gives_nan_in_that_example_only(bad):
    # Before: dkd_loss gave plausible finite numbers (and a negative TCKD) for labels 4, 7, -1.
    zs, zt, y = _random_case(40, 6, 4)
    y_bad = y.copy()
    y_bad[2] = bad
    keep = np.arange(6) != 2
    for name in LABEL_FNS:
        f = jax.jit(_traced_fns()[name])
        got, ref = np.asarray(f(zs, zt, y_bad, 2.0)), np.asarray(f(zs, zt, y, 2.0))
        assert np.isnan(got[2]), name
        assert got[keep].tobytes() == ref[keep].tobytes(), name  # the other rows, bit for bit


def test_out_of_range_labels_under_vmap_and_pmap():
    n_dev = jax.local_device_count()
    zs, zt, y = _random_case(41, 8, 4)
    y[5], y[6] = 4, -3
    for name in LABEL_FNS:
        f = functools.partial(_traced_fns()[name], T=2.0)
        for mapped in (jax.vmap(f), jax.pmap(f)):
            out = np.asarray(
                mapped(*(a.reshape(n_dev, 8 // n_dev, *a.shape[1:]) for a in (zs, zt, y)))
            ).ravel()
            assert np.isnan(out[5]) and np.isnan(out[6]), name
            assert np.all(np.isfinite(np.delete(out, [5, 6]))), name


@pytest.mark.parametrize("name", LABEL_FNS)
def test_gradient_of_a_mean_over_valid_examples_ignores_the_bad_example(name):
    # A linear student shares its parameters across the batch, so a NaN anywhere in the bad
    # example's backward pass (0 * inf from a `where`) would reach every parameter.
    rng = np.random.default_rng(6)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    w = rng.standard_normal((5, 4)).astype(np.float32)
    zt = (3.0 * rng.standard_normal((6, 4))).astype(np.float32)
    y = rng.integers(0, 4, size=6).astype(np.int32)
    y_bad = y.copy()
    y_bad[1] = 9
    valid = np.arange(6) != 1
    f = _traced_fns()[name]

    def masked_mean(w, labels):
        per_example = f(x @ w, zt, labels, 2.0)
        return jnp.sum(jnp.where(valid, per_example, 0.0)) / jnp.sum(valid)

    value_and_grad = jax.jit(jax.value_and_grad(masked_mean))
    (got, g_got), (want, g_want) = value_and_grad(w, y_bad), value_and_grad(w, y)
    assert np.isfinite(got) and np.all(np.isfinite(g_got))
    assert float(got) == float(want)
    np.testing.assert_array_equal(g_got, g_want)  # exactly the gradient of the valid examples
    # Per example: the bad example gets exactly zero gradient, the others theirs.
    g_logits = jax.jit(jax.grad(lambda s, lab: jnp.sum(jnp.where(valid, f(s, zt, lab, 2.0), 0))))
    g_bad, g_ref = g_logits(x @ w, y_bad), g_logits(x @ w, y)
    assert np.all(np.asarray(g_bad)[1] == 0.0)
    np.testing.assert_array_equal(np.asarray(g_bad)[valid], np.asarray(g_ref)[valid])


@pytest.mark.parametrize(
    ("dtype", "num_classes"), [(np.uint8, 256), (np.uint8, 300), (np.int8, 150)]
)
def test_labels_of_a_narrow_dtype_give_the_int32_results(dtype, num_classes):
    # Before: labels < num_classes wrapped in the labels' dtype (256 -> 0 in uint8), so valid
    # labels gave NaN, and a class id that wraps onto the label (261 -> 5) joined its target.
    zs, zt, _ = _random_case(43, 3, num_classes)
    y = np.array([5, 100, np.iinfo(dtype).max], dtype)
    for name, f in _traced_fns().items():
        for g in (f, jax.jit(f)):
            got = np.asarray(g(zs, zt, y, 2.0))
            want = np.asarray(g(zs, zt, y.astype(np.int32), 2.0))
            assert got.tobytes() == want.tobytes() and np.all(np.isfinite(got)), (name, dtype)
    _, tckd, nckd, _ = ref_terms(zs, zt, y.astype(np.int64), 2.0)
    np.testing.assert_allclose(losses.tckd_loss(zs, zt, y, temperature=2.0), tckd, rtol=1e-3)
    np.testing.assert_allclose(losses.nckd_loss(zs, zt, y, temperature=2.0), nckd, rtol=1e-3)
    losses.validate_labels(jnp.asarray(y), num_classes)  # valid: no error
    if num_classes <= np.iinfo(dtype).max:  # the one id past the classes is still out of range
        bad = np.array([num_classes], dtype)
        assert np.isnan(np.asarray(jax.jit(_traced_fns()["dkd"])(zs[:1], zt[:1], bad, 2.0)))
        with pytest.raises(ValueError, match=f"got {num_classes} at index 0"):
            losses.validate_labels(jnp.asarray(bad), num_classes)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nan_or_inf_teacher_logit_gives_nan_in_that_example_only(bad):
    # Before: the KL dropped NaN teacher probabilities as if they were 0: loss 0 for that
    # example, a NaN gradient, and a training loop watching its loss for NaN went on.
    zs, zt, y = _random_case(44, 4, 4)
    zt_bad = zt.copy()
    zt_bad[1, 2] = bad
    for name in ("kd", "tckd", "nckd", "dkd"):
        f = jax.jit(_traced_fns()[name])
        got, ref = np.asarray(f(zs, zt_bad, y, 2.0)), np.asarray(f(zs, zt, y, 2.0))
        assert np.isnan(got[1]), name
        assert np.delete(got, 1).tobytes() == np.delete(ref, 1).tobytes(), name
    masked = zt.copy()  # -inf: a class the teacher rules out, as before: finite, exact
    masked[1, 2 if y[1] != 2 else 3] = -np.inf
    kd = np.asarray(losses.kd_loss(zs, masked, temperature=2.0))
    pt = _np_softmax(masked.astype(np.float64) / 2.0)
    log_ps = _np_log_softmax(zs.astype(np.float64) / 2.0)
    ref = 4.0 * np.array(
        [np.sum(p[p > 0] * (np.log(p[p > 0]) - q[p > 0])) for p, q in zip(pt, log_ps, strict=True)]
    )
    np.testing.assert_allclose(kd, ref, rtol=1e-4)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_a_teacher_sure_of_the_target_gives_tckd_of_the_target_alone_and_no_nckd(num_classes):
    """A teacher ruling out every class but the target (``log(one_hot(labels))``) gave NaN for
    TCKD, NCKD and DKD (-inf - -inf in the non-target log-sum-exp), while KD was finite."""
    zs, _, y = _random_case(45, 5, num_classes)
    zt = np.where(np.eye(num_classes, dtype=bool)[y], 0.0, -np.inf).astype(np.float32)  # log 1-hot
    zt[0] = np.linspace(-1.0, 1.0, num_classes)  # an ordinary row beside them
    T = 2.0
    log_ps = _np_log_softmax(zs.astype(np.float64) / T)
    want_tckd = T**2 * -log_ps[np.arange(len(y)), y]
    _, tckd0, nckd0, _ = ref_terms(zs[:1], zt[:1], y[:1].astype(np.int64), T)
    want_tckd[0] = tckd0[0]
    for f in (lambda *a: a, jax.jit(lambda *a: a)):  # eager and traced inputs alike
        s, t, lab = f(zs, zt, y)
        tckd = np.asarray(losses.tckd_loss(s, t, lab, temperature=T))
        nckd = np.asarray(losses.nckd_loss(s, t, lab, temperature=T))
        kd = np.asarray(losses.kd_loss(s, t, temperature=T))
        dkd = np.asarray(losses.dkd_loss(s, t, lab, alpha=0.5, beta=8.0, temperature=T))
        np.testing.assert_allclose(tckd, want_tckd, rtol=1e-5)
        np.testing.assert_allclose(nckd[0], nckd0[0], rtol=1e-5)
        assert np.all(nckd[1:] == 0.0)
        np.testing.assert_allclose(kd[1:], tckd[1:], rtol=1e-6)  # KD = TCKD + (1 - 1) * NCKD
        np.testing.assert_allclose(dkd, 0.5 * tckd + 8.0 * nckd, rtol=1e-6)
    grad = jax.grad(lambda s: jnp.sum(losses.dkd_loss(s, zt, y, beta=8.0, temperature=T)))(zs)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_a_bad_teacher_row_masked_out_leaves_the_gradient_of_the_others():
    """``jnp.where(valid, loss, 0)`` over a NaN teacher row used to give NaN gradients for the
    shared weights (0 times the row's NaN partials), although the loss itself was finite."""
    x = jnp.eye(3)
    w = jnp.asarray(np.random.default_rng(46).normal(size=(3, 4)).astype(np.float32))
    zt = np.array([[0.0, np.nan, 1.0, 2.0], [1.0, 0.0, 2.0, -1.0], [np.inf, 0, 0, 0]], np.float32)
    y = np.array([0, 2, 1])
    valid = np.all(np.isfinite(zt), axis=1)
    for name, f in _traced_fns().items():
        if name == "ce":
            continue  # no teacher
        masked = jax.grad(lambda w, f=f: jnp.sum(jnp.where(valid, f(x @ w, zt, y, 2.0), 0.0)))(w)
        alone = jax.grad(lambda w, f=f: jnp.sum(f((x @ w)[valid], zt[valid], y[valid], 2.0)))(w)
        np.testing.assert_array_equal(np.asarray(masked), np.asarray(alone), err_msg=name)
        assert np.all(np.isnan(np.asarray(f(x @ w, zt, y, 2.0))[~valid])), name
    all_ruled_out = np.full((1, 4), -np.inf, np.float32)
    assert np.isnan(np.asarray(losses.dkd_loss(zt[1:2], all_ruled_out, y[:1])))


def test_losses_with_labels_name_missing_labels():
    z = jnp.zeros((2, 3))
    for name, call in {
        "cross_entropy": lambda: losses.cross_entropy(z, None),
        "tckd_loss": lambda: losses.tckd_loss(z, z, None),
        "nckd_loss": lambda: losses.nckd_loss(z, z, None),
        "dkd_loss": lambda: losses.dkd_loss(z, z, None),
    }.items():
        with pytest.raises(TypeError, match=rf"losses\.{name}: labels are required"):
            call()


@pytest.mark.parametrize("T", [0.0, -1.0, -4.0, -np.inf, np.inf, np.nan])
def test_traced_bad_temperature_makes_every_example_nan(T):
    zs, zt, y = _random_case(42, 5, 4)
    for name, f in _traced_fns().items():
        if name == "ce":
            continue  # no temperature
        out = jax.jit(f)(zs, zt, y, T)
        assert np.all(np.isnan(out)), (name, out)
        grad = jax.jit(jax.grad(lambda s, T, f=f: jnp.sum(f(s, zt, y, T))))(zs, T)
        assert np.all(np.asarray(grad) == 0.0), name  # no NaN from 0 * inf in the backward pass


@pytest.mark.parametrize("alpha,beta", [(-1.0, 8.0), (1.0, -0.5), (np.inf, 8.0), (1.0, np.nan)])
def test_traced_bad_dkd_weights_make_every_example_nan(alpha, beta):
    zs, zt, y = _random_case(43, 5, 4)
    f = jax.jit(lambda a, b: losses.dkd_loss(zs, zt, y, alpha=a, beta=b))
    assert np.all(np.isnan(f(alpha, beta)))
    assert np.all(np.isfinite(f(0.0, 0.0)))  # zero weights are valid


def _checked_dkd_mean(num_classes=4):
    def loss(s, t, y, T):
        losses.validate_labels(y, num_classes)
        losses.validate_temperature(T)
        return losses.dkd_loss(s, t, y, temperature=T).mean()

    return loss


def test_validate_labels_raises_inside_jit_with_checkify():
    zs, zt, y = _random_case(44, 6, 4)
    checked = jax.jit(checkify.checkify(_checked_dkd_mean()))
    err, value = checked(zs, zt, y, 2.0)
    assert err.get() is None and np.isfinite(value)
    err.throw()  # no error: returns None
    for labels, bad, index in (([0, 1, 2, 4, 3, 0], 4, 3), ([0, 9, 2, -1, 3, 0], 9, 1)):
        err, value = checked(zs, zt, np.array(labels, np.int32), 2.0)
        assert np.isnan(value)  # the unchecked result stays poisoned too
        pattern = rf"validate_labels: labels must lie in \[0, 4\), got {bad} at index {index}"
        with pytest.raises(checkify.JaxRuntimeError, match=pattern):
            err.throw()
    # Under vmap: the error names the mapped index too.
    per_row = checkify.checkify(jax.vmap(functools.partial(losses.validate_labels, num_classes=4)))
    err, _ = jax.jit(per_row)(np.array([[0, 1], [2, -1]], np.int32))
    assert "got -1 at index 1" in err.get()


def test_validate_temperature_raises_inside_jit_with_checkify():
    zs, zt, y = _random_case(45, 4, 3)
    checked = jax.jit(checkify.checkify(_checked_dkd_mean(num_classes=3)))
    assert checked(zs, zt, y, 4.0)[0].get() is None
    for T in (0.0, -2.0, np.inf, np.nan):
        err, _ = checked(zs, zt, y, T)
        with pytest.raises(checkify.JaxRuntimeError, match="temperature must be finite and > 0"):
            err.throw()


def test_validate_labels_eagerly_and_without_checkify():
    losses.validate_labels(jnp.array([0, 3, 1]), 4)  # fine
    losses.validate_labels(jnp.zeros((0,), jnp.int32), 4)  # empty: nothing to check
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), got 5 at index 2"):
        losses.validate_labels(jnp.array([0, 3, 5]), 4)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        losses.validate_temperature(-1.0)
    # Under jit without checkify the check cannot be staged: a trace-time error, not silence.
    with pytest.raises(ValueError, match="checkify"):
        jax.jit(functools.partial(losses.validate_labels, num_classes=4))(jnp.array([0, 1]))
    with pytest.raises(TypeError, match="integer class ids"):
        losses.validate_labels(jnp.array([0.0, 1.0]), 4)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        losses.validate_labels(jnp.array([0, 1]), 0)
    with pytest.raises(ValueError, match="temperature must be a scalar"):
        losses.validate_temperature(jnp.ones(2))
    # A NumPy integer count is an int (metrics takes it too); False said "got True"; a string
    # temperature was JAX's own "not a valid JAX array type".
    losses.validate_labels(jnp.array([0, 3]), np.int64(4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), got 4 at index 0"):
        losses.validate_labels(jnp.array([4]), np.int64(4))
    for bad in (4.0, True):
        with pytest.raises(ValueError, match=f"num_classes must be an int >= 1, got {bad}"):
            losses.validate_labels(jnp.array([0, 1]), bad)
    with pytest.raises(TypeError, match="temperature must be a number, got False"):
        losses.validate_temperature(False)
    with pytest.raises(TypeError, match=r"dkd_loss: guard_teacher must be True or False, got 1"):
        losses.dkd_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.array([0]), guard_teacher=1)
    with pytest.raises(TypeError, match=r"losses\.kd_loss: temperature must be a number, got '4'"):
        losses.kd_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), temperature="4")
