"""Unit tests of dkd_jax.train_lib: schedules, optimiser, objective, augmentation, the pmap step.

Uses small in-memory segments (12 x 16) and a tiny MACNN so every compile takes seconds.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dkd_jax import config as config_lib
from dkd_jax import (
    distributed,
    eval_lib,
    losses,
    models,
    objective,
    train_state,
    train_step,
)

SHAPE = (12, 16)
NUM_CLASSES = 4
STUDENT = config_lib.ArchConfig(preset="student", attention_heads=2, attention_hidden=4)
TEACHER = config_lib.ArchConfig(preset="teacher", attention_heads=2, attention_hidden=8)


def _spec(**kw):
    base = dict(
        teacher="none",
        augment=dataclasses.astuple(config_lib.AugmentConfig()),
        num_classes=NUM_CLASSES,
    )
    base.update(kw)
    return train_step.StepSpec(**base)


def _weights(loss="ce", *, steps_per_epoch=100, total_steps=1000, **kd):
    weights = objective.loss_weights(loss, config_lib.KDConfig(**{"warmup_epochs": 0.0, **kd}))
    return train_step.hyper(weights, steps_per_epoch=steps_per_epoch, total_steps=total_steps)


def _optim(**kw):
    return config_lib.OptimConfig(**{"schedule": "constant", "learning_rate": 3e-3, **kw})


# The step tests share one optimiser (one compilation). Adam's eps = 1 keeps the 1-vs-2-device
# comparison about gradients: with a tiny eps, Adam turns the float noise of exactly-zero
# gradients (conv biases before BatchNorm) into +-lr steps.
STEP_OPTIM = config_lib.OptimConfig(schedule="constant", learning_rate=0.5, eps=1.0)
# The precomputed-teacher step tests share this one (a per-epoch decay, so that the runtime run
# length shows in the updates; with the default 100 steps per epoch it is constant for them).
DKD_STEP_OPTIM = dataclasses.replace(STEP_OPTIM, schedule="step_epochs", decay_every=1)
# Every step test uses 16 segments: one batch shape, so tests with the same step share one
# compiled program (a step compiles in ~3 s; the suite's time is mostly compiles).
STEP_SEGMENTS = 16


@functools.cache
def _forward(model):
    """The model's plain eval-mode forward, jitted once per model (the reference of the padded,
    bucketed eval path; eager ``apply`` would compile every layer's operations one by one)."""
    return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def _data(n, seed=0):
    """Segments whose class shows as a brighter band of frequency rows (learnable)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % NUM_CLASSES).astype(np.int32)
    x = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    for i, y in enumerate(labels):
        x[i, 3 * y : 3 * y + 3] += 2.0
    return x, labels


def _batch(x, labels, mask, num_devices, teacher_logits=None):
    def shard(a):
        return a.reshape(num_devices, a.shape[0] // num_devices, *a.shape[1:])

    b = {"features": shard(x), "labels": shard(labels), "mask": shard(mask)}
    if teacher_logits is not None:
        b["teacher_logits"] = shard(teacher_logits)
    return b


def _fns(spec, devices, *, teacher_model=None, optim=None, arch=STUDENT):
    model = models.create_model(
        arch, num_classes=NUM_CLASSES, batch_norm_axis_name=distributed.AXIS
    )
    fns = train_step.make_train_functions(
        model,
        teacher_model,
        optim or STEP_OPTIM,
        spec,
        devices,
    )
    return model, fns


def _init(fns, seed=0, arch=STUDENT):
    model = models.create_model(arch, num_classes=NUM_CLASSES)
    return train_state.create_train_state(jax.random.PRNGKey(seed), model, fns.tx, SHAPE)


def _run(fns, devices, batches, *, weights=None, seed=0, teacher_vars=None):
    """Runs p_step over host batches; returns (host state, list of host metrics)."""
    weights = _weights() if weights is None else weights
    r_state = distributed.replicate(_init(fns, seed), devices)
    r_teacher = None if teacher_vars is None else distributed.replicate(teacher_vars, devices)
    key = jax.random.PRNGKey(42)
    out = []
    for b in batches:
        r_state, m = fns.p_step(r_state, b, r_teacher, weights, key)
        out.append(distributed.unreplicate(m))  # syncs every step (CPU collectives)
    return distributed.unreplicate(r_state), out


# ---------------------------------------------------------------------------------------------
# Schedules, optimiser, objective
# ---------------------------------------------------------------------------------------------


def test_step_epochs_schedule_matches_the_lineage_loop():
    spe = 3
    optim = config_lib.OptimConfig(schedule="step_epochs", decay_every=10, learning_rate=1e-3)
    sched = train_state.learning_rate_schedule(optim, steps_per_epoch=spe, total_steps=50 * spe)
    lr, expected = 1e-3, []
    for i in range(50):  # head_fusion/train.py: after epoch i > 0 with i % 10 == 0, lr /= 10
        expected += [lr] * spe
        if i > 0 and i % 10 == 0:
            lr /= 10
    got = np.asarray(jax.vmap(sched)(jnp.arange(50 * spe)))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got[11 * spe - 1] == pytest.approx(1e-3) and got[11 * spe] == pytest.approx(1e-4)


def test_step_cosine_and_warmup_schedules():
    step = train_state.learning_rate_schedule(
        _optim(schedule="step", decay_every=4, decay_factor=0.5, learning_rate=1.0),
        steps_per_epoch=3,
        total_steps=20,
    )
    np.testing.assert_allclose(
        np.asarray(jax.vmap(step)(jnp.arange(12))), [1.0] * 4 + [0.5] * 4 + [0.25] * 4
    )
    cos = train_state.learning_rate_schedule(
        _optim(schedule="cosine", learning_rate=2.0), steps_per_epoch=3, total_steps=100
    )
    assert float(cos(0)) == pytest.approx(2.0)
    assert float(cos(50)) == pytest.approx(1.0, rel=1e-5)
    assert float(cos(100)) == pytest.approx(0.0, abs=1e-6)
    warm = train_state.learning_rate_schedule(
        _optim(learning_rate=1.0, warmup_steps=4), steps_per_epoch=3, total_steps=100
    )
    np.testing.assert_allclose(
        np.asarray(jax.vmap(warm)(jnp.arange(6))), [0.25, 0.5, 0.75, 1, 1, 1], rtol=1e-6
    )


def test_optimizer_is_adam_with_coupled_l2_like_pytorch():
    lr, wd, b1, b2, eps = 0.1, 0.05, 0.9, 0.999, 1e-8
    tx = train_state.create_optimizer(
        _optim(learning_rate=lr, weight_decay=wd), steps_per_epoch=1, total_steps=10
    )
    theta = np.array([0.5, -1.0, 2.0])
    grads = [np.array([0.1, 0.2, -0.3]), np.array([-0.05, 0.4, 0.0]), np.array([0.3, -0.1, 0.2])]
    params = {"w": jnp.asarray(theta, jnp.float32)}
    state = tx.init(params)
    m = v = np.zeros(3)
    ref = theta.copy()
    for t, g in enumerate(grads, start=1):
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = optax.apply_updates(params, updates)
        gg = g + wd * ref  # torch.optim.Adam(weight_decay=wd): L2 added to the gradient
        m = b1 * m + (1 - b1) * gg
        v = b2 * v + (1 - b2) * gg**2
        ref = ref - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    np.testing.assert_allclose(np.asarray(params["w"]), ref, rtol=1e-5, atol=1e-6)
    adamw = optax.adamw(lr, weight_decay=wd)
    p2, s2 = {"w": jnp.asarray(theta, jnp.float32)}, None
    s2 = adamw.init(p2)
    for g in grads:
        u, s2 = adamw.update({"w": jnp.asarray(g, jnp.float32)}, s2, p2)
        p2 = optax.apply_updates(p2, u)
    assert not np.allclose(np.asarray(p2["w"]), ref, rtol=1e-4)  # decoupled decay differs


def test_kd_ramp_counts_epochs_from_one():
    got = [float(objective.kd_ramp(s, 5.0, 4)) for s in (0, 3, 4, 15, 16, 40)]
    np.testing.assert_allclose(got, [0.2, 0.2, 0.4, 0.8, 1.0, 1.0], rtol=1e-6)
    assert float(objective.kd_ramp(0, 0.0, 4)) == 1.0


@pytest.mark.parametrize("loss", ["dkd", "kd", "tckd", "nckd", "ce"])
def test_objective_follows_the_configured_loss(loss):
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(6, 4)) * 3, jnp.float32)
    t = jnp.asarray(rng.normal(size=(6, 4)) * 3, jnp.float32)
    y = jnp.asarray([0, 1, 2, 3, 1, 2])
    kd = config_lib.KDConfig(alpha=0.7, beta=3.0, kd_weight=0.9, ce_weight=0.5, temperature=2.0)
    w = objective.loss_weights(loss, kd)
    teacher = None if loss == "ce" else t
    terms = objective.loss_terms(s, teacher, y, y, jnp.ones(6), temperature=w["temperature"])
    got = objective.objective(terms, w, 0.25)
    ce = losses.cross_entropy(s, y)
    if loss == "ce":
        np.testing.assert_allclose(got, ce, rtol=1e-6)  # the CE student: plain CE
        assert set(terms) == {"ce"}
        return
    distill = {
        "dkd": losses.dkd_loss(s, t, y, alpha=0.7, beta=3.0, temperature=2.0),
        "kd": 0.9 * losses.kd_loss(s, t, temperature=2.0),
        "tckd": 0.7 * losses.tckd_loss(s, t, y, temperature=2.0),
        "nckd": 3.0 * losses.nckd_loss(s, t, y, temperature=2.0),
    }[loss]
    np.testing.assert_allclose(got, 0.5 * ce + 0.25 * distill, rtol=1e-5, atol=1e-7)


def test_teachers_always_train_on_plain_cross_entropy():
    w = objective.loss_weights("dkd", config_lib.KDConfig(ce_weight=0.1), role="teacher")
    assert (w["ce"], w["kd"], w["tckd"], w["nckd"], w["warmup_epochs"]) == (1, 0, 0, 0, 0)


def test_mixup_mixes_label_terms():
    rng = np.random.default_rng(1)
    s = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    ya, yb = jnp.asarray([0, 1, 2, 3, 0]), jnp.asarray([1, 1, 3, 0, 2])
    lam = jnp.asarray([1.0, 0.3, 0.5, 0.9, 0.0])

    @jax.jit  # one program: eagerly, each operation of the losses compiles on its own
    def both(s, t, ya, yb, lam):
        terms = objective.loss_terms(s, t, ya, yb, lam, temperature=4.0)
        ce = lam * losses.cross_entropy(s, ya) + (1 - lam) * losses.cross_entropy(s, yb)
        d = lam * losses.dkd_loss(s, t, ya) + (1 - lam) * losses.dkd_loss(s, t, yb)
        got = objective.objective(terms, _weights("dkd"), 1.0) - terms["ce"]
        return terms, ce, d, got, losses.kd_loss(s, t)

    terms, ce, d, got, kd = both(s, t, ya, yb, lam)
    np.testing.assert_allclose(terms["ce"], ce, rtol=1e-6)
    np.testing.assert_allclose(got, d, rtol=1e-5)
    np.testing.assert_allclose(terms["kd"], kd, rtol=1e-6)  # label-free


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------


def _aug(**kw):
    return config_lib.AugmentConfig(**kw)


def test_time_shift_is_a_bounded_circular_roll():
    x, y = _data(8)
    aug = _aug(time_shift_frames=3)
    out, yb, lam = jax.jit(lambda x, y, k: objective.augment_batch(x, y, k, aug))(
        x[..., None], y, jax.random.PRNGKey(3)
    )
    out = np.asarray(out)[..., 0]
    shifts = []
    for i in range(8):
        match = [s for s in range(-3, 4) if np.array_equal(out[i], np.roll(x[i], s, axis=1))]
        assert match, f"example {i} is not a roll of at most 3 frames"
        shifts.append(match[0])
    assert len(set(shifts)) > 1
    assert yb is y or np.array_equal(yb, y)
    np.testing.assert_array_equal(lam, 1.0)


@pytest.mark.parametrize("axis", ["freq", "time"])
def test_spec_augment_masks_are_bands_filled_with_the_mean(axis):
    x, y = _data(16, seed=2)
    kw = (
        {"freq_masks": 2, "freq_mask_width": 3}
        if axis == "freq"
        else {"time_masks": 2, "time_mask_width": 4}
    )
    out = np.asarray(
        objective.augment_batch(jnp.asarray(x[..., None]), y, jax.random.PRNGKey(5), _aug(**kw))[0]
    )[..., 0]
    ax = 0 if axis == "freq" else 1
    width = 3 if axis == "freq" else 4
    any_masked = False
    for i in range(16):
        fill = x[i].mean()
        changed = ~np.all(np.isclose(out[i], x[i]), axis=1 - ax)  # [F] or [T] lines changed
        if changed.any():
            any_masked = True
            lines = np.take(out[i], np.flatnonzero(changed), axis=ax)
            np.testing.assert_allclose(lines, fill, rtol=1e-5, atol=1e-5)
        assert changed.sum() <= 2 * width
        np.testing.assert_array_equal(
            np.take(out[i], np.flatnonzero(~changed), axis=ax),
            np.take(x[i], np.flatnonzero(~changed), axis=ax),
        )
    assert any_masked


def test_mixup_is_a_convex_combination_with_a_partner():
    x, y = _data(8, seed=4)
    out, yb, lam = objective.augment_batch(
        jnp.asarray(x[..., None]), jnp.asarray(y), jax.random.PRNGKey(7), _aug(mixup_alpha=0.4)
    )
    out, yb, lam = np.asarray(out)[..., 0], np.asarray(yb), np.asarray(lam)
    assert np.all((lam >= 0) & (lam <= 1)) and not np.allclose(lam, 1)
    for i in range(8):
        partners = [
            j
            for j in range(8)
            if np.allclose(out[i], lam[i] * x[i] + (1 - lam[i]) * x[j], atol=1e-5)
        ]
        assert partners and yb[i] in {y[j] for j in partners}


# ---------------------------------------------------------------------------------------------
# The pmap step
# ---------------------------------------------------------------------------------------------


def test_replicate_puts_one_copy_per_device_with_pmaps_layout():
    devices = jax.local_devices()[:2]
    tree = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "count": np.int32(7),
        "half": jnp.ones((3,), jnp.bfloat16),  # a device array in, as a train state holds
        "nested": {"b": np.float32(-1.5)},
        "empty": {},
    }
    out = distributed.replicate(tree, devices)
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    sharding = distributed.device_axis_sharding(devices)
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(tree), strict=True):
        want = np.asarray(want)
        assert got.shape == (2, *want.shape) and got.dtype == want.dtype
        assert got.sharding == sharding
        for shard, device in zip(got.addressable_shards, devices, strict=True):
            assert shard.device == device
            np.testing.assert_array_equal(np.asarray(shard.data)[0], want)
    back = distributed.unreplicate(out)
    np.testing.assert_array_equal(back["w"], tree["w"])
    assert back["count"] == 7


def test_two_devices_equal_one_device_for_the_same_global_batch():
    assert jax.local_device_count() == 2
    x, y = _data(STEP_SEGMENTS)
    mask = np.arange(STEP_SEGMENTS) < 13  # a last partial batch: 3 filler rows
    spec = _spec()
    results = {}
    for n in (1, 2):
        devices = jax.local_devices()[:n]
        _, fns = _fns(spec, devices)
        batches = [_batch(np.roll(x, k, 0), np.roll(y, k, 0), mask, n) for k in range(3)]
        results[n] = _run(fns, devices, batches)
    (s1, m1), (s2, m2) = results[1], results[2]
    # Same math, different float summation order across devices: tolerance 1e-5 relative.
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s1.batch_stats), jax.tree.leaves(s2.batch_stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(m1, m2, strict=True):
        assert float(a["count"]) == float(b["count"]) == 13.0
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_array_equal(a["confusion"], b["confusion"])
        assert a["confusion"].sum() == 13


def test_teacher_step_lowers_the_loss():
    devices = jax.local_devices()
    x, y = _data(STEP_SEGMENTS)
    _, fns = _fns(_spec(), devices)
    batch = _batch(x, y, np.ones(STEP_SEGMENTS, bool), len(devices))
    _, ms = _run(fns, devices, [batch] * 12)
    first, last = ms[0]["loss"] / ms[0]["count"], ms[-1]["loss"] / ms[-1]["count"]
    assert last < 0.8 * first, (first, last)


def test_student_dkd_step_lowers_the_loss_with_precomputed_teacher_logits():
    devices = jax.local_devices()
    x, y = _data(STEP_SEGMENTS)
    noise = np.random.default_rng(0).normal(size=(STEP_SEGMENTS, 4))
    teacher_logits = (np.eye(4)[y] * 4.0 + noise).astype(np.float32)
    _, fns = _fns(_spec(teacher="precomputed"), devices, optim=DKD_STEP_OPTIM)
    batch = _batch(x, y, np.ones(STEP_SEGMENTS, bool), len(devices), teacher_logits)
    _, ms = _run(fns, devices, [batch] * 12, weights=_weights("dkd"))
    assert ms[0]["tckd"] > 0 and ms[0]["nckd"] > 0
    assert ms[-1]["loss"] < 0.8 * ms[0]["loss"], (ms[0]["loss"], ms[-1]["loss"])


def test_live_teacher_is_frozen_and_never_donated():
    devices = jax.local_devices()
    x, y = _data(8)
    teacher = models.create_model(TEACHER, num_classes=NUM_CLASSES)
    t_vars = train_state.init_variables(jax.random.PRNGKey(9), teacher, SHAPE)
    before = jax.tree.map(np.copy, t_vars)
    spec = _spec(
        teacher="live",
        augment=dataclasses.astuple(_aug(time_shift_frames=2, freq_masks=1)),
    )
    _, fns = _fns(spec, devices, teacher_model=teacher)
    r_state = distributed.replicate(_init(fns), devices)
    r_teacher = distributed.replicate(t_vars, devices)
    batch = _batch(x, y, np.ones(8, bool), len(devices))
    for _ in range(2):
        r_state, m = fns.p_step(r_state, batch, r_teacher, _weights("dkd"), jax.random.PRNGKey(1))
        m = distributed.unreplicate(m)
        assert m["kd"] > 0
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(r_teacher))
    for a, b in zip(
        jax.tree.leaves(distributed.unreplicate(r_teacher)), jax.tree.leaves(before), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_loss_freezes_the_last_good_state():
    devices = jax.local_devices()
    x, y = _data(STEP_SEGMENTS)
    batch = _batch(x, y, np.ones(STEP_SEGMENTS, bool), len(devices))
    bad_x = x.copy()
    bad_x[5, 2, 3] = np.nan  # one corrupt segment in the second batch
    bad = _batch(bad_x, y, np.ones(STEP_SEGMENTS, bool), len(devices))
    _, fns = _fns(_spec(), devices)
    good, _ = _run(fns, devices, [batch])  # the state after step 0
    state, ms = _run(fns, devices, [batch, bad, batch])
    assert [float(m["nonfinite"]) for m in ms] == [0.0, 1.0, 0.0]
    assert float(ms[2]["count"]) == 0.0  # halted: later steps are no-ops
    assert int(state.step) == 1 and int(state.bad_step) == 1
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(good.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(state.batch_stats), jax.tree.leaves(good.batch_stats), strict=True
    ):
        np.testing.assert_array_equal(a, b)  # NaN batch statistics were not kept either


def test_nonfinite_update_freezes_the_initial_state_at_step_zero():
    """A finite loss and gradient whose update overflows (as an absurd learning rate would
    make it) is flagged too. Here Adam's first moment starts at 3e38, finite: its bias
    correction (/ 0.1 at step 1) overflows to inf in every parameter's update."""
    devices = jax.local_devices()
    x, y = _data(STEP_SEGMENTS)
    batch = _batch(x, y, np.ones(STEP_SEGMENTS, bool), len(devices))
    _, fns = _fns(_spec(), devices)
    start = _init(fns)
    poisoned = tuple(
        part._replace(mu=jax.tree.map(lambda m: jnp.full_like(m, 3e38), part.mu))
        if isinstance(part, optax.ScaleByAdamState)
        else part
        for part in start.opt_state
    )
    assert any(isinstance(part, optax.ScaleByAdamState) for part in poisoned)
    r_state = distributed.replicate(start.replace(opt_state=poisoned), devices)
    ms = []
    for _ in range(2):
        r_state, m = fns.p_step(r_state, batch, None, _weights(), jax.random.PRNGKey(42))
        ms.append(distributed.unreplicate(m))
    state = distributed.unreplicate(r_state)
    assert [float(m["nonfinite"]) for m in ms] == [1.0, 0.0]
    assert np.isfinite(float(ms[0]["loss"])) and np.isfinite(float(ms[0]["grad_norm"]))
    assert int(state.step) == 0 and int(state.bad_step) == 0
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(start.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_run_length_is_a_runtime_value_of_the_step():
    """Folds of different sizes (steps per epoch, total steps) share one compiled step, and the
    KD warm-up and the schedule follow the runtime values."""
    devices = jax.local_devices()
    x, y = _data(STEP_SEGMENTS)
    _, fns = _fns(_spec(teacher="precomputed"), devices, optim=DKD_STEP_OPTIM)
    tl = np.zeros((STEP_SEGMENTS, NUM_CLASSES), np.float32)
    batch = _batch(x, y, np.ones(STEP_SEGMENTS, bool), len(devices), tl)
    before = train_step.TRACE_COUNTS["step_fn"]
    losses = {}
    for spe in (1, 3):
        w = _weights("dkd", steps_per_epoch=spe, total_steps=10 * spe, warmup_epochs=4.0)
        r_state = distributed.replicate(_init(fns), devices)
        for _ in range(3):
            r_state, m = fns.p_step(r_state, batch, None, w, jax.random.PRNGKey(0))
            m = distributed.unreplicate(m)
        losses[spe] = (float(m["loss"]), distributed.unreplicate(r_state))
    assert train_step.TRACE_COUNTS["step_fn"] - before <= 1
    # Step 2 is epoch 3 of a 1-step epoch (lr decayed twice, KD ramp 3/4) but epoch 1 of a
    # 3-step epoch: different updates from the same start.
    assert losses[1][0] != losses[3][0]


@pytest.mark.parametrize("kind", ["constant", "step", "step_epochs", "cosine"])
def test_schedule_with_runtime_run_length_equals_the_constant_one_bit_for_bit(kind):
    optim = _optim(schedule=kind, learning_rate=3e-3, warmup_steps=7, decay_every=5)
    counts = jnp.arange(0, 400, dtype=jnp.int32)
    for spe, total in ((13, 130), (3, 321), (1, 1)):
        const = jax.jit(
            train_state.learning_rate_schedule(optim, steps_per_epoch=spe, total_steps=total)
        )(counts)

        def runtime(c, s, t):
            return train_state.learning_rate_schedule(optim, steps_per_epoch=s, total_steps=t)(c)

        traced = jax.jit(runtime)(counts, jnp.int32(spe), jnp.int32(total))
        np.testing.assert_array_equal(np.asarray(const), np.asarray(traced))


def test_predict_logits_pads_the_last_batch_and_compiles_once():
    model = models.create_model(STUDENT, num_classes=NUM_CLASSES)
    variables = train_state.init_variables(jax.random.PRNGKey(0), model, SHAPE)
    x, _ = _data(13)
    ref = np.asarray(_forward(model)(variables, x[..., None]))
    before = eval_lib.TRACE_COUNTS["predict"]
    got = eval_lib.predict_logits(model, variables, x, batch_size=4)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    got7 = eval_lib.predict_logits(model, variables, x[:7], batch_size=4)
    np.testing.assert_allclose(got7, ref[:7], rtol=1e-5, atol=1e-5)
    assert eval_lib.TRACE_COUNTS["predict"] - before <= 1
    assert eval_lib.predict_logits(model, variables, x[:0], batch_size=4).shape == (0, 4)
    with pytest.raises(ValueError, match=r"features must be \[N, F, T\]"):
        eval_lib.predict_logits(model, variables, x[0], batch_size=4)


def test_single_process_runs_do_not_initialize_distributed(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.maybe_initialize_distributed() is False
    # process options without a coordinator used to train single-process in silence
    with pytest.raises(distributed.DistributedError, match="without a coordinator"):
        distributed.maybe_initialize_distributed(num_processes=4, process_id=2)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    for value, message in (("abc", "JAX_NUM_PROCESSES='abc'"), ("0", "JAX_NUM_PROCESSES='0'")):
        monkeypatch.setenv("JAX_NUM_PROCESSES", value)
        with pytest.raises(distributed.DistributedError, match=f"environment {message}: expected"):
            distributed.maybe_initialize_distributed()


def test_predict_logits_pads_a_short_last_batch_only_to_a_small_bucket():
    # A small eval set must not pay for a whole eval batch: the last batch is padded to the next
    # power-of-two per-device size (>= EVAL_MIN_BUCKET), which bounds the compiled shapes.
    model = models.create_model(STUDENT, num_classes=NUM_CLASSES)
    variables = train_state.init_variables(jax.random.PRNGKey(1), model, SHAPE)
    x, _ = _data(45)
    ref = np.asarray(_forward(model)(variables, x[..., None]))
    before = eval_lib.TRACE_COUNTS["predict"]
    for n in (1, 3, 16, 17, 45):  # 2 devices, 32 per device: buckets 8, 16, 32 rows
        got = eval_lib.predict_logits(model, variables, x[:n], batch_size=64)
        assert got.shape == (n, NUM_CLASSES)
        np.testing.assert_allclose(got, ref[:n], rtol=1e-5, atol=1e-5)
    assert eval_lib.TRACE_COUNTS["predict"] - before <= 3
    # Several full batches and a short tail: rows come back in order, none lost or duplicated.
    got = eval_lib.predict_logits(model, variables, x, batch_size=16)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert [eval_lib._tail_rows(k, 32) for k in (1, 8, 9, 17, 32, 40)] == [8, 8, 16, 32, 32, 32]
    assert eval_lib._tail_rows(3, 4) == 4


@pytest.mark.parametrize("preset", ["student", "teacher", "area_teacher"])
def test_faster_init_compilation_gives_the_same_parameters_bit_for_bit(preset):
    # The production initialiser (INIT_COMPILER_OPTIONS on the CPU), for the model and shape
    # that test_export.py also initialises: one of the two compiles here is shared.
    model = models.build_model(preset, num_classes=NUM_CLASSES)
    shape = (26, 63)
    fast = train_state.init_variables(jax.random.PRNGKey(3), model, shape)
    plain = jax.jit(train_state._init_function(model.clone(batch_norm_axis_name=None), shape))
    assert jax.default_backend() == "cpu" and train_state.INIT_COMPILER_OPTIONS
    plain = jax.device_get(plain(jax.random.PRNGKey(3)))
    assert jax.tree.structure(plain) == jax.tree.structure(fast)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(fast), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_a_compilation_cache_named_in_the_environment_wins(monkeypatch, tmp_path):
    from dkd_jax import train_lib

    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv(train_lib.CACHE_ENV, str(tmp_path / "env_cache"))
        assert train_lib.enable_compilation_cache(tmp_path / "run_cache") is False
        assert jax.config.jax_compilation_cache_dir == before
        assert not (tmp_path / "run_cache").exists()
        monkeypatch.delenv(train_lib.CACHE_ENV)
        assert train_lib.enable_compilation_cache(tmp_path / "run_cache") is True
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "run_cache")
        assert (tmp_path / "run_cache").is_dir()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
