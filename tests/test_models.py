"""Tests for dkd_jax.models: MACNN shapes, sizes, BatchNorm, attention semantics, NumPy oracle."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import jax_utils
from numpy.lib.stride_tricks import sliding_window_view

from dkd_jax import area_attention, models, train_state

LAYOUTS = {
    "mfcc26": (26, 63),
    "logmel40": (40, 200),
    "logmel64": (64, 200),
    "logmel128": (128, 200),
}
# Trunk without attention or classifier: convs 92,688 + BatchNorm scale/bias 480 (paper_spec §2.1).
TRUNK_PARAMS = 92688 + 480


def init_variables(model, shape=(1, 5, 5, 1), seed=0):
    """Real initialisation, jitted (an rbg key compiles several times faster than threefry),
    at the production initialiser's compiler options (the same bits, a faster compile)."""
    key = jax.random.key(seed, impl="rbg")
    init = jax.jit(
        lambda k, x: model.init(k, x, train=False),
        compiler_options=train_state.INIT_COMPILER_OPTIONS,
    )
    return init(key, jnp.zeros(shape, jnp.float32))


def random_variables(model, seed=0):
    """Variables with the model's exact structure, filled by NumPy (no init compile).

    Kernels U(±√(6/fan_in)), non-zero biases, non-trivial BatchNorm affine parameters and running
    statistics. At this scale the channel softmax is sharp, as in a trained model.
    """
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 5, 5, 1)), train=False)
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        keys = [k.key for k in path]
        shape = leaf.shape
        if keys[-1] == "kernel":
            fan_in = int(np.prod(shape[:3])) if len(shape) == 4 else shape[0]
            bound = math.sqrt(6.0 / fan_in)  # He-uniform: activations keep their scale
            return rng.uniform(-bound, bound, shape).astype(np.float32)
        if keys[-1] == "scale":
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if keys[-1] == "var":
            return rng.uniform(0.5, 2.0, shape).astype(np.float32)
        return rng.normal(0.0, 0.1, shape).astype(np.float32)  # biases and running means

    return jax.tree_util.tree_map_with_path(fill, shapes)


def jit_eval(model):
    """Jitted eval forward returning (logits, intermediates)."""
    return jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))


@pytest.fixture(scope="module")
def student():
    model = models.build_model("student")
    return model, random_variables(model), jit_eval(model)


@pytest.fixture(scope="module")
def mfcc_batch():
    return jax.random.normal(jax.random.key(42), (3, 26, 63, 1), jnp.float32)


# ---------------------------------------------------------------------------------------------
# NumPy oracle of the whole network (eval mode), float64, written from paper_spec §2.1 (NCHW
# thinking, NHWC arrays). The heads are fused literally: concatenated along height, ReLU, GAP.


def np_conv(x, kernel, bias, pad):
    x = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
    kh, kw = kernel.shape[:2]
    windows = sliding_window_view(x, (kh, kw), axis=(1, 2))  # [B, H', W', C, kh, kw]
    return np.einsum("bhwcij,ijco->bhwo", windows, kernel) + bias


def np_bn(x, params, stats):
    return (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * params["scale"] + params["bias"]


def np_pool(x):
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def np_macnn(variables, x):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    s = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
    x = np.asarray(x, np.float64)

    def block(y, name, pad):
        y = np_conv(y, p["conv" + name]["kernel"], p["conv" + name]["bias"], pad)
        return np.maximum(np_bn(y, p["bn" + name], s["bn" + name]), 0.0)

    y = np.concatenate(
        [block(x, "1a", ((4, 4), (0, 0))), block(x, "1b", ((0, 0), (3, 3)))], axis=-1
    )
    y = np_pool(block(y, "2", ((1, 1), (1, 1))))
    y = np_pool(block(y, "3", ((1, 1), (1, 1))))
    y = block(y, "4", ((1, 1), (1, 1)))
    y = block(y, "5", ((1, 1), (1, 1)))
    hf = p["head_fusion"]
    outs = []
    for i in range(hf["query"]["kernel"].shape[1]):
        q, k, v = (y @ hf[n]["kernel"][:, i] + hf[n]["bias"][i] for n in ("query", "key", "value"))
        logits = q * k
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)  # softmax over the channel axis
        outs.append(w * v)  # [B, H, W, d]
    fused = np.maximum(np.concatenate(outs, axis=1), 0.0)  # heads stacked along height
    embedding = fused.mean(axis=(1, 2))
    return embedding @ p["classifier"]["kernel"] + p["classifier"]["bias"]


@pytest.mark.parametrize("shape,heads,hidden", [((2, 7, 9), 1, 4), ((2, 26, 63), 3, 5)])
def test_forward_matches_numpy_oracle(shape, heads, hidden):
    model = models.MACNN(attention_heads=heads, attention_hidden=hidden)
    variables = random_variables(model)
    x = jax.random.normal(jax.random.key(1), (*shape, 1))
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    np.testing.assert_allclose(logits, np_macnn(variables, x), rtol=1e-4, atol=1e-5)


def test_head_attention_hand_checked():
    # One head, d = 2, identity Q/K/V on a 2-channel point x = (1, 2):
    # softmax(x ⊙ x) = softmax(1, 4) = (e / (e + e⁴), e⁴ / (e + e⁴)); O = that ⊙ x.
    layer = models.HeadFusionAttention(num_heads=1, hidden=2)
    eye = {"kernel": np.eye(2, dtype=np.float32)[:, None, :], "bias": np.zeros((1, 2), np.float32)}
    params = {"query": eye, "key": eye, "value": eye}
    x = jnp.asarray([[[[1.0, 2.0], [0.0, 0.0]]]])  # [1, 1, 2, 2]: second point all zeros
    out = layer.apply({"params": params}, x)
    e, e4 = math.e, math.e**4
    want = [[e / (e + e4) * 1.0, e4 / (e + e4) * 2.0], [0.0, 0.0]]
    np.testing.assert_allclose(out[0, 0, :, 0, :], want, rtol=1e-6, atol=1e-7)
    assert out.shape == (1, 1, 2, 1, 2)


# ---------------------------------------------------------------------------------------------
# Shapes, sizes, presets


@pytest.mark.parametrize("preset", ["student", "teacher", "area_teacher"])
def test_output_shapes_for_each_feature_layout(preset):
    model = models.build_model(preset)
    variables = random_variables(model)
    for freq, time in LAYOUTS.values():
        x = jax.ShapeDtypeStruct((5, freq, time, 1), jnp.float32)
        logits, state = jax.eval_shape(
            lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]), variables, x
        )
        assert logits.shape == (5, 4) and logits.dtype == jnp.float32
        height, width = models.feature_map_size(freq, time)
        inter = state["intermediates"]
        if model.attention == "head_fusion":
            (weights,) = inter["head_fusion"]["attention_weights"]
            assert weights.shape == (
                5,
                height,
                width,
                model.attention_heads,
                model.attention_hidden,
            )
        else:
            (weights,) = inter["area_attention"]["attention_weights"]
            areas = area_attention.area_count(height, width, max_height=3, max_width=3)
            assert weights.shape == (5, model.attention_heads, height * width, areas)
        assert inter["embedding"][0].shape == (
            5,
            model.attention_hidden * (model.attention_heads if model.attention == "area" else 1),
        )


def test_feature_map_sizes_follow_the_spec():
    # paper_spec §2.1: MFCC-26 [26, 63] → [6, 15]; logfbank [197, 40] → [49, 9].
    assert models.feature_map_size(26, 63) == (6, 15)
    assert models.feature_map_size(197, 40) == (49, 9)
    assert models.feature_map_size(40, 200) == (9, 49)
    assert models.feature_map_size(128, 200) == (31, 49)
    assert models.minimum_input_size() == (5, 5)
    assert models.feature_map_size(5, 5) == (1, 1)
    assert models.feature_map_size(4, 5)[0] == 0


def test_real_forward_on_every_layout(student):
    model, variables, _ = student
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    for freq, time in LAYOUTS.values():
        logits = apply(variables, jnp.ones((2, freq, time, 1)))
        assert logits.shape == (2, 4) and np.all(np.isfinite(logits))


@pytest.mark.parametrize(
    "preset,expected",
    [("student", 155636), ("teacher", 591860), ("area_teacher", 156404), ("tiny", 97092)],
)
def test_exact_parameter_counts_independent_of_input_size(preset, expected):
    model = models.build_model(preset)
    for freq, time in LAYOUTS.values():
        shapes = jax.eval_shape(
            lambda x: model.init(jax.random.key(0), x, train=False),
            jax.ShapeDtypeStruct((1, freq, time, 1), jnp.float32),
        )
        assert models.count_parameters(shapes["params"]) == expected
    heads, hidden = model.attention_heads, model.attention_hidden
    if model.attention == "head_fusion":
        attention = heads * 3 * (80 * hidden + hidden)
        embedding = hidden
    else:
        attention = area_attention.projection_parameter_count(80, qkv_features=heads * hidden)
        embedding = heads * hidden
    assert expected == TRUNK_PARAMS + attention + embedding * 4 + 4
    assert models.preset_summary()[preset] == expected


def test_parameter_count_scales_with_classes_and_area_without_projection():
    def count(model):
        shapes = jax.eval_shape(
            lambda x: model.init(jax.random.key(0), x, train=False),
            jax.ShapeDtypeStruct((1, 26, 63, 1), jnp.float32),
        )
        return models.count_parameters(shapes["params"])

    assert count(models.build_model("student", num_classes=7)) == 155636 - 260 + 64 * 7 + 7
    lineage_area = models.build_model("area_teacher", area_projection=False)
    assert count(lineage_area) == TRUNK_PARAMS + 80 * 4 + 4


def test_build_model_overrides_and_errors():
    model = models.build_model("teacher", num_classes=3, attention="area", init="flax")
    assert (model.attention_heads, model.attention_hidden) == (8, 256)
    assert model.attention == "area" and model.init_scheme == "flax" and model.num_classes == 3
    assert set(models.MODEL_PRESETS) >= {"student", "teacher", "area_teacher"}
    with pytest.raises(ValueError, match="unknown preset"):
        models.build_model("huge")
    with pytest.raises(ValueError, match="unknown MACNN field"):
        models.build_model("student", heads=3)
    with pytest.raises(ValueError, match="not both"):
        models.build_model("student", init="flax", init_scheme="pytorch")
    x = jax.ShapeDtypeStruct((1, 26, 63, 1), jnp.float32)
    for kwargs, match in [
        ({"attention": "global"}, "attention must be"),
        ({"init_scheme": "xavier"}, "init_scheme must be"),
        ({"attention_heads": 0}, "attention_heads"),
        ({"attention": "area", "area_projection": False, "attention_heads": 3}, "do not divide"),
        ({"attention": "area", "area_dropout": 1.0}, "area_dropout"),
        ({"attention": "area", "area_max_width": 0}, "area_max_height and area_max_width"),
        ({"dtype": jnp.int32}, "dtype"),
    ]:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(
                lambda x, kwargs=kwargs: models.MACNN(**kwargs).init(
                    jax.random.key(0), x, train=False
                ),
                x,
            )


@pytest.mark.parametrize("shape", [(2, 4, 63, 1), (2, 26, 4, 1), (2, 1, 1, 1)])
def test_too_small_input_names_the_minimum(student, shape):
    model, variables, _ = student
    with pytest.raises(ValueError, match=r"at least \(5, 5\)"):
        jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.zeros(shape))


@pytest.mark.parametrize("preset", ["student", "area_teacher"])
def test_smallest_input_works(preset):
    model = models.build_model(preset)
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        random_variables(model), jnp.ones((2, 5, 5, 1))
    )
    assert logits.shape == (2, 4) and np.all(np.isfinite(logits))


def test_wrong_layout_is_rejected(student):
    model, variables, _ = student
    with pytest.raises(ValueError, match=r"\[batch, freq, time, 1\]"):
        jax.eval_shape(lambda x: model.apply(variables, x, train=False), jnp.zeros((2, 1, 26, 63)))
    with pytest.raises(ValueError, match=r"\[batch, freq, time, 1\]"):
        jax.eval_shape(lambda x: model.apply(variables, x, train=False), jnp.zeros((2, 26, 63)))


# ---------------------------------------------------------------------------------------------
# Initialisation


def _kernels_with_fan_in(params):
    """(path, kernel, bias, fan_in) for every conv / dense / attention projection."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [k.key for k in path]
        if keys[-1] != "kernel":
            continue
        node = params
        for key in keys[:-1]:
            node = node[key]
        kernel = np.asarray(leaf)
        fan_in = int(np.prod(kernel.shape[:3])) if keys[0].startswith("conv") else kernel.shape[0]
        out.append(("/".join(keys[:-1]), kernel, np.asarray(node["bias"]), fan_in))
    return out


def test_layer_initializers_bounds():
    key = jax.random.key(0)
    kernel_init, bias_init = models.layer_initializers("pytorch", 144)
    kernel = np.asarray(kernel_init(key, (3, 3, 16, 400)))
    bias = np.asarray(bias_init(key, (400,)))
    assert np.abs(kernel).max() <= 1 / 12 and np.abs(bias).max() <= 1 / 12
    # kaiming-uniform(a=√5): std = gain/√fan_in with gain = √(2/(1+5)) → U(±1/√fan_in).
    assert abs(kernel.std() - math.sqrt(2 / 6) / 12) < 0.02 / 12
    kernel_init, bias_init = models.layer_initializers("flax", 144)
    assert np.all(np.asarray(bias_init(key, (400,))) == 0)
    with pytest.raises(ValueError, match="init must be"):
        models.layer_initializers("he", 3)


def test_pytorch_init_is_kaiming_uniform_with_uniform_bias():
    # Full model: convs, area-attention projections, classifier.
    params = init_variables(models.build_model("area_teacher"))["params"]
    layers = _kernels_with_fan_in(params)
    assert {name for name, *_ in layers} == {
        *(f"conv{i}" for i in ("1a", "1b", 2, 3, 4, 5)),
        *(f"area_attention/{n}" for n in ("query", "key", "value")),
        "classifier",
    }
    # The teacher's head-fusion projections (the largest tensors) on their own.
    heads = models.HeadFusionAttention(num_heads=8, hidden=256, init_scheme="pytorch")
    head_init = jax.jit(heads.init, compiler_options=train_state.INIT_COMPILER_OPTIONS)
    head_params = head_init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 1, 1, 80)))
    layers += [
        (f"head_fusion/{n}", *rest) for n, *rest in _kernels_with_fan_in(head_params["params"])
    ]
    for name, kernel, bias, fan_in in layers:
        bound = 1.0 / math.sqrt(fan_in)
        assert np.abs(kernel).max() <= bound, name
        assert np.abs(bias).max() <= bound and np.any(bias != 0), name
        if kernel.size > 10000:  # U(-b, b) has std b / sqrt(3)
            assert abs(kernel.std() - bound / math.sqrt(3)) < 0.03 * bound, name
            assert abs(kernel.mean()) < 0.03 * bound, name


def test_flax_init_is_lecun_normal_with_zero_bias():
    model = models.build_model("student", init="flax")
    params = init_variables(model)["params"]
    layers = _kernels_with_fan_in(params)
    assert len(layers) == 6 + 3 + 1
    for name, kernel, bias, fan_in in layers:
        assert np.all(bias == 0), name
        if kernel.size > 10000:
            assert abs(kernel.std() - 1 / math.sqrt(fan_in)) < 0.05 / math.sqrt(fan_in), name


# ---------------------------------------------------------------------------------------------
# BatchNorm: train vs eval


def test_batch_norm_updates_only_in_training(student, mfcc_batch):
    model, variables, forward = student
    out_eval, _ = forward(variables, mfcc_batch)
    # Eval: deterministic and per-example (no batch statistics).
    np.testing.assert_array_equal(out_eval, forward(variables, mfcc_batch)[0])
    single = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, mfcc_batch[:1])
    np.testing.assert_allclose(single, out_eval[:1], rtol=1e-5, atol=1e-6)
    # Eval leaves the running statistics alone even when they are mutable.
    _, unchanged = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["batch_stats"]))(
        variables, mfcc_batch
    )
    for a, b in zip(
        jax.tree.leaves(unchanged["batch_stats"]),
        jax.tree.leaves(variables["batch_stats"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    # Train: batch statistics, updated with PyTorch momentum 0.1.
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    out_train, updates = train(variables, mfcc_batch)
    assert not np.allclose(out_train, out_eval, atol=1e-3)
    pair = jnp.concatenate([mfcc_batch[:1], mfcc_batch[1:2] * 3.0 + 1.0])
    assert not np.allclose(train(variables, pair)[0][0], out_train[0], atol=1e-4)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    conv1a = np_conv(
        np.asarray(mfcc_batch, np.float64),
        p["conv1a"]["kernel"],
        p["conv1a"]["bias"],
        ((4, 4), (0, 0)),
    )
    old = variables["batch_stats"]["bn1a"]
    new = updates["batch_stats"]["bn1a"]
    np.testing.assert_allclose(
        new["mean"], 0.9 * old["mean"] + 0.1 * conv1a.mean((0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        new["var"], 0.9 * old["var"] + 0.1 * conv1a.var((0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    for name, stats in variables["batch_stats"].items():
        assert not np.allclose(updates["batch_stats"][name]["mean"], stats["mean"]), name


def test_synchronised_batch_norm_under_pmap_matches_the_full_batch():
    model = models.build_model("tiny", batch_norm_axis_name="batch")
    plain = models.build_model("tiny")
    variables = random_variables(plain)
    x = jax.random.normal(jax.random.key(3), (4, 8, 12, 1))
    full_logits, full_updates = jax.jit(
        lambda v, x: plain.apply(v, x, train=True, mutable=["batch_stats"])
    )(variables, x)

    def step(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    logits, updates = jax.pmap(step, axis_name="batch")(
        jax_utils.replicate(variables), x.reshape(2, 2, 8, 12, 1)
    )
    np.testing.assert_allclose(np.asarray(logits).reshape(4, 4), full_logits, rtol=1e-4, atol=1e-5)
    for a, b in zip(
        jax.tree.leaves(jax_utils.unreplicate(updates)), jax.tree.leaves(full_updates), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Attention semantics


def test_attention_weights_are_a_softmax_over_channels(student, mfcc_batch):
    model, variables, forward = student
    logits, state = forward(variables, mfcc_batch)
    # Sowing does not change the return value.
    plain = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, mfcc_batch)
    np.testing.assert_allclose(logits, plain, rtol=1e-6, atol=1e-7)
    (weights,) = state["intermediates"]["head_fusion"]["attention_weights"]
    assert weights.shape == (3, 6, 15, 4, 64)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    assert np.all(weights >= 0) and weights.max() > 0.2  # sharp enough to be informative


def test_attention_is_pointwise_in_time_and_frequency():
    # Channel softmax acts at each point separately: changing one point changes only its output.
    # (A softmax over time or frequency would spread the change to every point.)
    layer = models.HeadFusionAttention(num_heads=2, hidden=3)
    rng = np.random.default_rng(0)
    params = {
        n: {"kernel": rng.normal(size=(6, 2, 3)), "bias": rng.normal(size=(2, 3))}
        for n in ("query", "key", "value")
    }
    x = rng.normal(size=(1, 4, 5, 6))
    apply = jax.jit(lambda x: layer.apply({"params": params}, x))
    out = np.asarray(apply(x))
    x[0, 2, 3] += 5.0
    out2 = np.asarray(apply(x))
    changed = np.any(out != out2, axis=(-2, -1))[0]
    assert changed[2, 3] and changed.sum() == 1


def test_consistent_channel_permutation_leaves_logits_unchanged(student, mfcc_batch):
    _, variables, forward = student
    perm = np.random.default_rng(0).permutation(64)
    params = jax.tree.map(np.asarray, variables["params"])

    def permuted(names):
        new = jax.tree.map(np.copy, params)
        for name in names:
            new["head_fusion"][name]["kernel"] = params["head_fusion"][name]["kernel"][..., perm]
            new["head_fusion"][name]["bias"] = params["head_fusion"][name]["bias"][..., perm]
        new["classifier"]["kernel"] = params["classifier"]["kernel"][perm]
        return {"params": new, "batch_stats": variables["batch_stats"]}

    base, state = forward(variables, mfcc_batch)
    same, _ = forward(permuted(("query", "key", "value")), mfcc_batch)
    np.testing.assert_allclose(same, base, rtol=1e-5, atol=1e-6)
    # Permuting only the values breaks the channel pairing: the check can fail.
    _, broken = forward(permuted(("value",)), mfcc_batch)
    embedding = np.asarray(state["intermediates"]["embedding"][0])[:, perm]
    difference = np.abs(np.asarray(broken["intermediates"]["embedding"][0]) - embedding)
    assert difference.max() > 0.1 * np.abs(embedding).max()


def test_head_fusion_is_the_mean_of_single_head_models(student, mfcc_batch):
    model, variables, forward = student
    logits, state = forward(variables, mfcc_batch)
    (embedding,) = state["intermediates"]["embedding"]
    single = models.MACNN(attention_heads=1, attention_hidden=64)
    single_forward = jit_eval(single)
    per_head_embeddings, per_head_logits = [], []
    for i in range(model.attention_heads):
        params = dict(variables["params"])
        params["head_fusion"] = jax.tree.map(
            lambda a, i=i: a[:, i : i + 1] if a.ndim == 3 else a[i : i + 1],
            variables["params"]["head_fusion"],
        )
        out, st = single_forward(
            {"params": params, "batch_stats": variables["batch_stats"]}, mfcc_batch
        )
        per_head_embeddings.append(st["intermediates"]["embedding"][0])
        per_head_logits.append(out)
    np.testing.assert_allclose(embedding, np.mean(per_head_embeddings, 0), rtol=1e-5, atol=1e-6)
    # The classifier is affine, so the logits are the mean of the single-head logits too.
    np.testing.assert_allclose(logits, np.mean(per_head_logits, 0), rtol=1e-5, atol=1e-6)
    # And the heads differ, so the average is not trivially one head's output.
    assert not np.allclose(per_head_embeddings[0], per_head_embeddings[1], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Compilation, devices, dtype


def test_jit_traces_once_per_shape(student):
    model, variables, _ = student
    traces = []

    @jax.jit
    def forward(v, x):
        traces.append(x.shape)
        return model.apply(v, x, train=False)

    forward(variables, jnp.zeros((2, 26, 63, 1)))
    forward(variables, jnp.ones((2, 26, 63, 1)))
    assert len(traces) == 1
    forward(variables, jnp.zeros((2, 40, 63, 1)))
    forward(variables, jnp.ones((2, 40, 63, 1)))
    assert traces == [(2, 26, 63, 1), (2, 40, 63, 1)]


@pytest.mark.parametrize("preset", ["student", "area_teacher"])
def test_pmap_on_two_devices_gives_identical_results(preset, mfcc_batch):
    assert jax.local_device_count() == 2
    model = models.build_model(preset)
    variables = random_variables(model)
    single = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, mfcc_batch)
    mapped = jax.pmap(lambda v, x: model.apply(v, x, train=False))(
        jax_utils.replicate(variables), jnp.stack([mfcc_batch, mfcc_batch])
    )
    mapped = np.asarray(mapped)
    np.testing.assert_array_equal(mapped[0], mapped[1])
    np.testing.assert_allclose(mapped[0], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["student", "area_teacher"])
def test_bfloat16_close_to_float32(preset, mfcc_batch):
    model = models.build_model(preset)
    bf16 = models.build_model(preset, dtype=jnp.bfloat16)
    variables = random_variables(model)
    bf16_shapes = jax.eval_shape(
        lambda: bf16.init(jax.random.key(0), jnp.zeros((1, 5, 5, 1)), train=False)
    )
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bf16_shapes))
    f32_logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, mfcc_batch)
    bf16_logits = jax.jit(lambda v, x: bf16.apply(v, x, train=False))(variables, mfcc_batch)
    assert bf16_logits.dtype == jnp.float32
    scale = float(np.abs(np.asarray(f32_logits)).max())
    np.testing.assert_allclose(bf16_logits, f32_logits, atol=0.05 * scale)


def test_bfloat16_training_gradients_are_float32_and_finite(mfcc_batch):
    bf16 = models.build_model("student", dtype=jnp.bfloat16)
    variables = random_variables(bf16)

    @jax.jit
    def grads(params):
        def loss(p):
            logits, _ = bf16.apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                mfcc_batch,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(logits**2)

        return jax.grad(loss)(params)

    for g in jax.tree.leaves(grads(variables["params"])):
        assert g.dtype == jnp.float32 and np.all(np.isfinite(g))


def test_area_model_dropout_needs_rng_only_in_training(mfcc_batch):
    model = models.build_model("area_teacher")
    variables = random_variables(model)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    a = forward(variables, mfcc_batch)
    np.testing.assert_array_equal(a, forward(variables, mfcc_batch))
    with pytest.raises(ValueError, match="'dropout' rng"):
        jax.eval_shape(
            lambda x: model.apply(variables, x, train=True, mutable=["batch_stats"]), mfcc_batch
        )
    train = jax.jit(
        lambda v, x, key: model.apply(
            v, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
        )[0]
    )
    b1 = train(variables, mfcc_batch, jax.random.key(0))
    b2 = train(variables, mfcc_batch, jax.random.key(1))
    assert b1.shape == (3, 4) and np.all(np.isfinite(b1))
    assert not np.allclose(b1, b2)
    # Query chunking in the full model gives the same logits.
    chunked = models.build_model("area_teacher", area_query_chunk_size=16)
    np.testing.assert_allclose(
        jax.jit(lambda v, x: chunked.apply(v, x, train=False))(variables, mfcc_batch),
        a,
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("shape", [(3, 6, 8, 5), (2, 7, 9, 3), (1, 2, 2, 1)])
def test_max_pool_equals_flax_max_pool_and_its_gradient_bit_for_bit(shape):
    """The strided-slice pool (faster on XLA:CPU) gives nn.max_pool's values and
    select-and-scatter's gradient exactly, ties included (the first maximum takes it all)."""
    import flax.linen as nn

    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    x[..., :2] = np.round(x[..., :2])  # many ties
    x[0, :2, :2, 0] = 0.0  # a window of four equal values
    x[0, :2, :2, -1] = [[-1.0, -0.0], [0.0, -2.0]]  # zeros of both signs: the first one wins
    g = rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])).astype(np.float32)

    def flax_pool(v):
        return nn.max_pool(v, window_shape=(2, 2), strides=(2, 2), padding="VALID")

    for fn in (lambda f: f, jax.jit):
        want, want_vjp = jax.vjp(fn(flax_pool), x)
        got, got_vjp = jax.vjp(fn(models.max_pool_2x2), x)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        plain = np.asarray(fn(models.max_pool_2x2)(x))  # the primal (inference) form
        assert plain.tobytes() == np.asarray(want).tobytes()  # the sign of a zero too
        np.testing.assert_array_equal(np.asarray(got_vjp(g)[0]), np.asarray(want_vjp(g)[0]))


def test_max_pool_gradient_equals_select_and_scatter_on_every_window_of_special_values():
    """All 7**4 windows of {NaN, ±0, 1, 2, ±inf}: the same corner gets the gradient as with
    nn.max_pool, NaN windows included (select-and-scatter's ``>=`` walk); the same values where
    a window holds no NaN, and NaN where it does (XLA:CPU's reduce_window drops NaNs, and gives
    -inf for four of them). The sign of a zero maximum is not compared here: reduce_window's own
    changes with the batch and channel count (a window alone vs in this batch: 25 differ)."""
    import itertools

    import flax.linen as nn

    values = [np.nan, -0.0, 0.0, 1.0, 2.0, -np.inf, np.inf]
    windows = np.array(list(itertools.product(values, repeat=4)), np.float32)
    x = windows.reshape(-1, 2, 2, 1)
    g = np.arange(1, len(x) + 1, dtype=np.float32).reshape(-1, 1, 1, 1)

    def flax_pool(v):
        return nn.max_pool(v, window_shape=(2, 2), strides=(2, 2), padding="VALID")

    want, want_vjp = jax.vjp(flax_pool, x)
    got, got_vjp = jax.vjp(models.max_pool_2x2, x)
    has_nan = np.isnan(windows).any(axis=1)
    got, want = np.asarray(got).ravel(), np.asarray(want).ravel()
    np.testing.assert_array_equal(got[~has_nan], want[~has_nan])
    assert np.isnan(got[has_nan]).all()
    np.testing.assert_array_equal(np.asarray(got_vjp(g)[0]), np.asarray(want_vjp(g)[0]))
