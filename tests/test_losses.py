"""Tests for dkd_jax.losses: NumPy float64 oracles, hand-computed cases, identities, gradients,
extreme logits, bfloat16, jit tracing, vmap and pmap on the 2 forced CPU devices."""

from __future__ import annotations

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.special import logsumexp

from dkd_jax import losses

# The tests exercise the jitted functions, as production runs them. Hyperparameters are traced
# (one compilation per shape); eager-only behaviour (label value checks) is tested via `losses.*`.
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
