"""The PyTorch reference of bench/compare_torch.py computes what dkd-jax computes.

With weights ported from Flax, the PyTorch MACNN's logits (student and teacher presets, eval- and
train-mode BatchNorm), its BatchNorm running statistics, its DKD loss and one training step of each
kind (CE; frozen teacher + DKD) agree with dkd-jax's. Skipped when torch is not installed.
"""

import importlib.util
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _bench_module(name):
    """A bench/ script as a module, without putting bench/ on sys.path (its data_prep.py would
    shadow the data_prep package, also in every process spawned later)."""
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


torch_macnn = _bench_module("torch_macnn")  # compare_torch imports it by name
compare_torch = _bench_module("compare_torch")

from test_losses import ATOL, RTOL, ref_terms_logspace  # noqa: E402

from dkd_jax import losses, models  # noqa: E402

SHAPE = (16, 20)  # small input: trunk map 3×4
BN_MOMENTUM = 0.1  # PyTorch convention


def random_variables(model, seed=0):
    """Variables of the model's structure filled by NumPy: He-uniform kernels (activations keep
    their scale, so the logits are O(1)), non-zero biases, non-trivial BatchNorm parameters and
    running statistics."""
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 5, 5, 1)), train=False)
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            fan_in = int(np.prod(shape[:3])) if len(shape) == 4 else shape[0]
            bound = math.sqrt(6.0 / fan_in)
            return rng.uniform(-bound, bound, shape).astype(np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if name == "var":
            return rng.uniform(0.5, 2.0, shape).astype(np.float32)
        return rng.normal(0.0, 0.1, shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def batch(n=6, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *SHAPE)).astype(np.float32), (np.arange(n) % 4).astype(np.int32)


def bn_counts(freq, time, n):
    """Values per channel in each BatchNorm's batch statistics (n × the layer's map size)."""
    h, w = freq - 1, time - 1  # both first convolutions: 10×2 pad (4, 0) and 2×8 pad (0, 3)
    counts = {"bn1a": n * h * w, "bn1b": n * h * w, "bn2": n * h * w}
    h, w = h // 2, w // 2
    counts["bn3"] = n * h * w
    h, w = h // 2, w // 2
    counts.update(bn4=n * h * w, bn5=n * h * w)
    return counts


def expected_torch_var(old_var, new_flax_var, count):
    """PyTorch's running variance from Flax's: both are 0.9·old + 0.1·batch variance, with the
    biased batch variance in Flax and the unbiased one (× n/(n−1)) in PyTorch."""
    biased = (new_flax_var - (1 - BN_MOMENTUM) * old_var) / BN_MOMENTUM
    return (1 - BN_MOMENTUM) * old_var + BN_MOMENTUM * biased * count / (count - 1)


@pytest.fixture(scope="module", params=["student", "teacher"])
def ported(request):
    flax_model = models.build_model(request.param)
    variables = random_variables(flax_model)
    torch_model = torch_macnn.load_flax_variables(torch_macnn.build(request.param), variables)
    return request.param, flax_model, variables, torch_model


def test_eval_logits_match_flax(ported):
    _, flax_model, variables, torch_model = ported
    x, _ = batch()
    ours = np.asarray(
        jax.jit(lambda v, x: flax_model.apply(v, x[..., None], train=False))(variables, x)
    )
    theirs = torch_macnn.predict(torch_model, torch.from_numpy(x)).numpy()
    assert np.abs(ours).max() > 0.1  # not a trivially small output
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_train_logits_and_batch_stats_match_flax(ported):
    preset, flax_model, variables, _ = ported
    x, _ = batch()

    @jax.jit
    def train_forward(v, x):
        return flax_model.apply(v, x[..., None], train=True, mutable=["batch_stats"])

    ours, updated = train_forward(variables, x)
    model = torch_macnn.load_flax_variables(torch_macnn.build(preset), variables)
    model.train()
    with torch.no_grad():
        theirs = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)
    stats = torch_macnn.flax_variables(model)["batch_stats"]
    for name, count in bn_counts(*SHAPE, len(x)).items():
        new = np.asarray(updated["batch_stats"][name]["var"])
        np.testing.assert_allclose(
            stats[name]["mean"], updated["batch_stats"][name]["mean"], atol=1e-5
        )
        want = expected_torch_var(variables["batch_stats"][name]["var"], new, count)
        np.testing.assert_allclose(stats[name]["var"], want, rtol=1e-4, atol=1e-5)


def test_port_round_trip_and_shape_error():
    student = models.build_model("student")
    variables = random_variables(student, seed=3)
    back = torch_macnn.flax_variables(
        torch_macnn.load_flax_variables(torch_macnn.build("student"), variables)
    )
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, variables))
    with pytest.raises(ValueError, match="head_fusion/query/kernel"):
        torch_macnn.load_flax_variables(torch_macnn.build("teacher"), variables)
    with pytest.raises(ValueError, match="unknown preset"):
        torch_macnn.build("area_teacher")


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_dkd_loss_and_gradient_match_jax(scale):
    rng = np.random.default_rng(4)
    zs = (scale * rng.normal(size=(7, 4))).astype(np.float32)
    zt = (scale * rng.normal(size=(7, 4))).astype(np.float32)
    y = np.array([0, 1, 2, 3, 0, 1, 2], np.int32)
    kw = {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}
    # jitted, as the training step runs it (and one compile, not one per operation)
    ours = jax.jit(lambda s, t: losses.dkd_loss(s, t, y, **kw))(zs, zt)
    grad_ours = jax.jit(jax.grad(lambda s: losses.dkd_loss(s, zt, y, **kw).mean()))(zs)
    s = torch.tensor(zs, requires_grad=True)
    theirs = torch_macnn.dkd_loss(s, torch.from_numpy(zt), torch.from_numpy(y).long(), **kw)
    theirs.mean().backward()
    # Both against the float64 oracle at test_losses' float32 tolerance, so within twice it of
    # each other (a tighter direct check fails on some CPUs: at scale 1 both sides are 1e-5
    # from the oracle on a loss of 0.34, each summing its terms in its own order).
    _, tckd, nckd = ref_terms_logspace(zs, zt, y, kw["temperature"])
    truth = kw["alpha"] * tckd + kw["beta"] * nckd
    atol = ATOL * kw["temperature"] ** 2
    np.testing.assert_allclose(ours, truth, rtol=RTOL, atol=atol)
    np.testing.assert_allclose(theirs.detach().numpy(), truth, rtol=RTOL, atol=atol)
    np.testing.assert_allclose(theirs.detach().numpy(), ours, rtol=2 * RTOL, atol=2 * atol)
    np.testing.assert_allclose(s.grad.numpy(), grad_ours, rtol=1e-4, atol=1e-7)
    assert np.all(np.isfinite(s.grad.numpy()))


def test_kd_ramp_matches_the_step_schedule():
    assert torch_macnn.kd_ramp(0, 5.0, 10) == pytest.approx(0.2)
    assert torch_macnn.kd_ramp(19, 5.0, 10) == pytest.approx(0.4)
    assert torch_macnn.kd_ramp(1000, 5.0, 10) == 1.0
    assert torch_macnn.kd_ramp(0, 0.0, 10) == 1.0


def test_one_dkd_step_matches_ours():
    """One step of the project's compiled DKD step (via compare_torch.build_ours: frozen teacher,
    CE + ramp·DKD, Adam with coupled L2) and of the PyTorch step from the same weights: same loss,
    same updated parameters and running statistics. (The CE step is the same code with the
    distillation weights at 0; compiling it too would double this test's cost.)"""
    x, y = batch(n=8, seed=5)
    ours = compare_torch.build_ours("dkd", x, y, devices=jax.local_devices()[:1])
    theirs = compare_torch.build_theirs("dkd", x, y, ours, device="cpu")
    before = ours.variables()
    ours.run()
    theirs.run()
    assert theirs.loss() == pytest.approx(ours.loss(), rel=1e-5)
    after_ours, after_theirs = ours.variables(), theirs.variables()
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), after_ours["params"], before["params"])
    assert min(jax.tree.leaves(moved)) > 1e-4  # Adam's first step moves every tensor ~lr
    jax.tree.map(
        lambda t, o: np.testing.assert_allclose(t, o, atol=2e-5, rtol=0),
        after_theirs["params"],
        after_ours["params"],
    )
    for name, count in bn_counts(*SHAPE, len(x)).items():
        got, new = after_theirs["batch_stats"][name], after_ours["batch_stats"][name]
        np.testing.assert_allclose(got["mean"], new["mean"], atol=1e-5)
        want = expected_torch_var(before["batch_stats"][name]["var"], new["var"], count)
        np.testing.assert_allclose(got["var"], want, rtol=1e-4, atol=1e-5)


def test_inference_sides_agree():
    """Both inference sides predict the same logits from the same (initial) weights."""
    x, y = batch(n=5, seed=6)
    ours = compare_torch.build_ours("inference", x, y, devices=jax.local_devices()[:1])
    theirs = compare_torch.build_theirs("inference", x, y, ours, device="cpu")
    ours.run()
    theirs.run()
    assert np.isnan(ours.loss()) and np.isnan(theirs.loss())
    assert ours.logits().shape == (5, 4)
    np.testing.assert_allclose(theirs.logits(), ours.logits(), atol=1e-5, rtol=0)


def test_teacher_ce_sides_train_the_same_teacher():
    """``teacher_ce`` trains the teacher (8 heads × 256) on both sides, from the same weights;
    its step is the CE step's code (test_one_dkd_step_matches_ours) on the teacher's layers
    (test_train_logits_and_batch_stats_match_flax[teacher])."""
    x, y = batch(n=4, seed=7)
    ours = compare_torch.build_ours("teacher_ce", x, y, devices=jax.local_devices()[:1])
    theirs = compare_torch.build_theirs("teacher_ce", x, y, ours, device="cpu")
    mine = ours.variables()
    assert mine["params"]["head_fusion"]["query"]["kernel"].shape == (80, 8, 256)
    assert ours.teacher_variables is None  # no frozen teacher: the teacher is the trained model
    jax.tree.map(np.testing.assert_array_equal, theirs.variables(), mine)
