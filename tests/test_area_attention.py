"""Tests for dkd_jax.area_attention: against a NumPy oracle that enumerates areas one by one."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import jax_utils

from dkd_jax import area_attention as aa
from dkd_jax import models, train_state

# ---------------------------------------------------------------------------------------------
# NumPy oracle: every area enumerated explicitly (no summed-area tables), float64.


def np_areas(height, width, max_h, max_w):
    """[(h, w, top, left)] in the module's documented order."""
    out = []
    for h in range(1, min(max_h, height) + 1):
        for w in range(1, min(max_w, width) + 1):
            for top in range(height - h + 1):
                for left in range(width - w + 1):
                    out.append((h, w, top, left))
    return out


def np_area_attention(q, k, v, max_h, max_w, mask=None):
    """q, k [B, H, W, heads, dk], v [B, H, W, heads, dv] -> (out [B, H, W, heads, dv], weights)."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    batch, height, width, heads, depth = q.shape
    areas = np_areas(height, width, max_h, max_w)
    keys = np.stack([k[:, t : t + h, l : l + w].mean(axis=(1, 2)) for h, w, t, l in areas], 1)
    values = np.stack([v[:, t : t + h, l : l + w].sum(axis=(1, 2)) for h, w, t, l in areas], 1)
    logits = np.einsum("bqnd,band->bnqa", q.reshape(batch, -1, heads, depth), keys)
    logits /= math.sqrt(depth)
    if mask is not None:
        valid = np.stack([mask[:, t : t + h, l : l + w].all(axis=(1, 2)) for h, w, t, l in areas])
        logits = np.where(valid.T[:, None, None, :], logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bnqa,band->bqnd", weights, values)
    return out.reshape(batch, height, width, heads, -1), weights


def np_project(x, params, name, heads):
    p = params[name]
    out = np.einsum("bhwc,cnd->bhwnd", np.asarray(x, np.float64), np.asarray(p["kernel"]))
    if "bias" in p:
        out = out + np.asarray(p["bias"])
    return out


def make_layer(**kwargs):
    return aa.MultiScaleAreaAttention(**kwargs)


def init_layer(layer, x, seed=0):
    """Jitted init with an rbg key (threefry init compiles several times slower on CPU), at the
    production initialiser's compiler options (the same bits, a faster compile)."""
    key = jax.random.key(seed, impl="rbg")
    init = jax.jit(
        lambda k, x: layer.init(k, x, train=False),
        compiler_options=train_state.INIT_COMPILER_OPTIONS,
    )
    return init(key, x)


def apply(layer, variables, x, *, train=False, mutable=False, **arrays):
    """``layer.apply`` compiled as one program: run eagerly, every operation of the layer
    compiles on its own (~60 small XLA compiles per call, most of this file's time).
    ``arrays``: the other array arguments (mask, rngs)."""
    return jax.jit(lambda v, x, arrays: layer.apply(v, x, train=train, mutable=mutable, **arrays))(
        variables, x, arrays
    )


@pytest.fixture(scope="module")
def feature_map():
    return jax.random.normal(jax.random.key(0), (2, 4, 5, 6), jnp.float32)


# ---------------------------------------------------------------------------------------------
# Area enumeration and features


@pytest.mark.parametrize("height,width", [(1, 1), (1, 7), (4, 5), (6, 15), (9, 49)])
@pytest.mark.parametrize("max_h,max_w", [(1, 1), (1, 3), (2, 3), (3, 3), (5, 2), (10, 10)])
def test_area_count_formula_matches_enumeration(height, width, max_h, max_w):
    expected = len(np_areas(height, width, max_h, max_w))
    assert aa.area_count(height, width, max_height=max_h, max_width=max_w) == expected
    shapes = aa.area_shapes(height, width, max_height=max_h, max_width=max_w)
    assert shapes == [(h, w) for h in range(1, min(max_h, height) + 1)
                      for w in range(1, min(max_w, width) + 1)]  # fmt: skip


def test_area_counts_of_the_feature_layouts():
    # The attention maps of MFCC-26 and 40/64/128-mel inputs with 3×3 areas (module docstring).
    sizes = {(26, 63): 630, (40, 200): 3456, (64, 200): 6048, (128, 200): 12960}
    for (freq, time), expected in sizes.items():
        h, w = models.feature_map_size(freq, time)
        assert aa.area_count(h, w, max_height=3, max_width=3) == expected


@pytest.mark.parametrize("max_h,max_w", [(1, 1), (2, 3), (3, 3), (5, 2)])
def test_area_features_match_brute_force(max_h, max_w):
    x = np.random.default_rng(1).normal(size=(2, 4, 5, 3, 2)).astype(np.float32)
    mean, total, size = aa.compute_area_features(jnp.asarray(x), max_height=max_h, max_width=max_w)
    areas = np_areas(4, 5, max_h, max_w)
    want_sum = np.stack([x[:, t : t + h, l : l + w].sum((1, 2)) for h, w, t, l in areas], 1)
    np.testing.assert_allclose(total, want_sum, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, want_sum / size[None, :, None, None], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(size, [h * w for h, w, _, _ in areas])
    assert mean.dtype == total.dtype == jnp.float32


def test_area_sums_stay_accurate_on_the_largest_map_and_in_bfloat16():
    # 31×49 is the 128-mel attention map; non-negative features (post-ReLU) maximise the table.
    x = np.random.default_rng(2).uniform(0, 10, size=(1, 31, 49, 2)).astype(np.float32)
    _, total, _ = aa.compute_area_features(jnp.asarray(x), max_height=3, max_width=3)
    areas = np_areas(31, 49, 3, 3)
    x64 = x.astype(np.float64)
    want = np.stack([x64[:, t : t + h, l : l + w].sum((1, 2)) for h, w, t, l in areas], 1)
    np.testing.assert_allclose(total, want, rtol=2e-5, atol=2e-3)
    # bf16 input: the table is still float32, so the only error is the input's own rounding.
    xb = jnp.asarray(x, jnp.bfloat16)
    _, total_b, _ = aa.compute_area_features(xb, max_height=3, max_width=3)
    xb64 = np.asarray(xb.astype(jnp.float32), np.float64)
    want_b = np.stack([xb64[:, t : t + h, l : l + w].sum((1, 2)) for h, w, t, l in areas], 1)
    assert total_b.dtype == jnp.float32
    np.testing.assert_allclose(total_b, want_b, rtol=2e-5, atol=2e-3)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="max area size"):
        aa.area_count(3, 3, max_height=0, max_width=2)
    with pytest.raises(ValueError, match="at least 1×1"):
        aa.area_count(0, 3, max_height=1, max_width=1)


# ---------------------------------------------------------------------------------------------
# The layer against the oracle


@pytest.mark.parametrize("max_h,max_w", [(1, 1), (1, 3), (2, 3), (3, 3), (5, 2)])
def test_layer_matches_numpy_oracle(feature_map, max_h, max_w):
    layer = make_layer(num_heads=2, qkv_features=8, max_area_height=max_h, max_area_width=max_w)
    variables = init_layer(layer, feature_map, 1)
    params = jax.tree.map(np.asarray, variables["params"])
    # Non-zero biases so the mean-vs-sum treatment of biases is exercised.
    params = jax.tree.map(lambda p: p + 0.1 * np.arange(p.size).reshape(p.shape) / p.size, params)
    out, state = apply(layer, {"params": params}, feature_map, mutable=["intermediates"])
    q, k, v = (np_project(feature_map, params, n, 2) for n in ("query", "key", "value"))
    want, want_w = np_area_attention(q, k, v, max_h, max_w)
    assert out.shape == (2, 4, 5, 8)
    np.testing.assert_allclose(out, want.reshape(2, 4, 5, 8), rtol=1e-4, atol=1e-5)
    (weights,) = state["intermediates"]["attention_weights"]
    assert weights.shape == (2, 2, 20, aa.area_count(4, 5, max_height=max_h, max_width=max_w))
    np.testing.assert_allclose(weights, want_w, rtol=1e-4, atol=1e-6)


def test_without_projection_is_lineage_self_attention(feature_map):
    # q = k = v = x, heads split the channels; no parameters at all.
    layer = make_layer(num_heads=3, use_projection=False, max_area_height=2, max_area_width=2)
    variables = init_layer(layer, feature_map, 0)
    assert models.count_parameters(variables.get("params", {})) == 0
    out = apply(layer, variables, feature_map)
    x = np.asarray(feature_map).reshape(2, 4, 5, 3, 2)
    want, _ = np_area_attention(x, x, x, 2, 2)
    np.testing.assert_allclose(out, want.reshape(2, 4, 5, 6), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="use_projection=False"):
        make_layer(use_projection=False, qkv_features=4).init(
            jax.random.key(0), feature_map, train=False
        )


def test_one_by_one_areas_are_plain_dot_product_attention(feature_map):
    layer = make_layer(num_heads=2, qkv_features=8, max_area_height=1, max_area_width=1)
    variables = init_layer(layer, feature_map, 2)
    out = apply(layer, variables, feature_map)

    def project(name):
        return nn.DenseGeneral((2, 4), name=name).apply(
            {"params": variables["params"][name]}, feature_map
        )

    q, k, v = (project(n).reshape(2, 20, 2, 4) for n in ("query", "key", "value"))
    want = nn.dot_product_attention(q, k, v).reshape(2, 4, 5, 8)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_output_projection_and_parameter_counts(feature_map):
    cases = [
        {"qkv_features": 8, "num_heads": 2},
        {"qkv_features": 8, "num_heads": 4, "use_bias": False},
        {"qkv_features": 4, "num_heads": 1, "out_features": 5},
        {"num_heads": 2},  # qkv_features = C = 6
    ]
    for kwargs in cases:
        layer = make_layer(**kwargs)
        variables = init_layer(layer, feature_map)
        expected = aa.projection_parameter_count(
            6,
            qkv_features=kwargs.get("qkv_features"),
            out_features=kwargs.get("out_features"),
            use_bias=kwargs.get("use_bias", True),
        )
        assert models.count_parameters(variables["params"]) == expected, kwargs
        out = jax.eval_shape(
            lambda v, x, layer=layer: layer.apply(v, x, train=False), variables, feature_map
        )
        width = kwargs.get("out_features") or kwargs.get("qkv_features") or 6
        assert out.shape == (2, 4, 5, width)
    # 80 channels, 4 heads × 64, bias: 3·(80·256 + 256) = 62,208 (the area teacher's attention).
    assert aa.projection_parameter_count(80, qkv_features=256) == 62208
    # The count does not depend on the map size.
    big = jnp.zeros((1, 9, 11, 6))
    layer = make_layer(num_heads=2, qkv_features=8)
    small_vars = init_layer(layer, feature_map)
    big_vars = jax.eval_shape(lambda: layer.init(jax.random.key(0), big, train=False))
    assert models.count_parameters(small_vars) == models.count_parameters(big_vars)


def test_bad_settings_raise(feature_map):
    with pytest.raises(ValueError, match="do not split over"):
        make_layer(num_heads=4).init(jax.random.key(0), feature_map, train=False)
    with pytest.raises(ValueError, match=r"\[batch, H, W, C\]"):
        make_layer().init(jax.random.key(0), feature_map[0], train=False)
    with pytest.raises(ValueError, match="dropout_rate"):
        make_layer(dropout_rate=1.0).init(jax.random.key(0), feature_map, train=False)


# ---------------------------------------------------------------------------------------------
# Masking


def test_mask_excludes_every_area_touching_an_invalid_position(feature_map):
    mask = np.ones((2, 4, 5), bool)
    mask[0, :, 3:] = False  # example 0: last two time steps are padding
    mask[1, 2, 1] = False  # example 1: one hole
    layer = make_layer(num_heads=2, qkv_features=8, max_area_height=2, max_area_width=3)
    variables = init_layer(layer, feature_map, 3)
    out, state = apply(
        layer, variables, feature_map, mask=jnp.asarray(mask), mutable=["intermediates"]
    )
    params = jax.tree.map(np.asarray, variables["params"])
    q, k, v = (np_project(feature_map, params, n, 2) for n in ("query", "key", "value"))
    want, want_w = np_area_attention(q, k, v, 2, 3, mask=mask)
    np.testing.assert_allclose(out, want.reshape(2, 4, 5, 8), rtol=1e-4, atol=1e-5)
    (weights,) = state["intermediates"]["attention_weights"]
    valid = np.asarray(aa.area_mask(jnp.asarray(mask), max_height=2, max_width=3))
    assert np.all(np.asarray(weights)[~np.broadcast_to(valid[:, None, None], weights.shape)] == 0)
    np.testing.assert_allclose(weights, want_w, rtol=1e-4, atol=1e-6)

    # Features at invalid positions cannot reach any valid query.
    noisy = np.where(mask[..., None], feature_map, 100.0 * np.asarray(feature_map) + 7.0)
    out_noisy = apply(layer, variables, jnp.asarray(noisy), mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out_noisy)[mask], np.asarray(out)[mask], rtol=1e-5)


def test_fully_masked_example_gives_uniform_weights_not_nan(feature_map):
    mask = jnp.zeros((2, 4, 5), bool)
    layer = make_layer(num_heads=1, qkv_features=4)
    variables = init_layer(layer, feature_map, 0)
    out, state = apply(layer, variables, feature_map, mask=mask, mutable=["intermediates"])
    (weights,) = state["intermediates"]["attention_weights"]
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(weights, 1.0 / weights.shape[-1], rtol=1e-6)
    with pytest.raises(ValueError, match="mask must be"):
        layer.apply(variables, feature_map, train=False, mask=mask[:, :3])


# ---------------------------------------------------------------------------------------------
# Dropout


def test_dropout_only_in_training_with_an_rng(feature_map):
    layer = make_layer(num_heads=2, qkv_features=8, dropout_rate=0.5)
    plain = make_layer(num_heads=2, qkv_features=8)
    variables = init_layer(layer, feature_map, 0)
    eval_out, eval_state = apply(layer, variables, feature_map, mutable=["intermediates"])
    # Eval: deterministic, no rng needed, identical to the layer without dropout.
    np.testing.assert_array_equal(eval_out, apply(plain, variables, feature_map))
    np.testing.assert_array_equal(
        eval_out, apply(layer, variables, feature_map, rngs={"dropout": jax.random.key(5)})
    )
    # Train without the rng: a clear error, not silently deterministic.
    with pytest.raises(ValueError, match="'dropout' rng"):
        layer.apply(variables, feature_map, train=True)

    def train_apply(seed):
        rngs = {"dropout": jax.random.key(seed)}
        return apply(
            layer, variables, feature_map, train=True, rngs=rngs, mutable=["intermediates"]
        )

    out1, state1 = train_apply(1)
    out1_again, _ = train_apply(1)
    out2, _ = train_apply(2)
    np.testing.assert_array_equal(out1, out1_again)
    assert not np.allclose(out1, out2)
    assert not np.allclose(out1, eval_out)
    # Each weight is either dropped or rescaled by 1 / (1 - rate); about half are dropped.
    w_eval = np.asarray(eval_state["intermediates"]["attention_weights"][0])
    w_train = np.asarray(state1["intermediates"]["attention_weights"][0])
    dropped = w_train == 0
    np.testing.assert_allclose(w_train[~dropped], 2.0 * w_eval[~dropped], rtol=1e-5)
    assert 0.4 < dropped.mean() < 0.6
    # Rate 0 in training needs no rng and equals eval.
    np.testing.assert_array_equal(apply(plain, variables, feature_map, train=True), eval_out)


# ---------------------------------------------------------------------------------------------
# Query chunking, transformations, dtype


@pytest.mark.parametrize("chunk", [3, 7, 20, 64])
def test_query_chunks_give_the_same_result_and_gradients(feature_map, chunk):
    mask = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 4, 5)) > 0.2)
    full = make_layer(num_heads=2, qkv_features=8, max_area_height=2, max_area_width=3)
    chunked = full.clone(query_chunk_size=chunk)
    variables = init_layer(full, feature_map, 4)

    def loss(module, params, x):
        out = module.apply({"params": params}, x, train=False, mask=mask)
        return jnp.sum(jnp.sin(out))

    for a, b in zip(
        jax.jit(jax.value_and_grad(lambda p, x: loss(full, p, x), argnums=(0, 1)))(
            variables["params"], feature_map
        ),
        jax.jit(jax.value_and_grad(lambda p, x: loss(chunked, p, x), argnums=(0, 1)))(
            variables["params"], feature_map
        ),
        strict=True,
    ):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_chunked_dropout_is_seeded_and_training_only(feature_map):
    layer = make_layer(num_heads=2, qkv_features=8, dropout_rate=0.3, query_chunk_size=6)
    variables = init_layer(layer, feature_map, 0)
    eval_out = apply(layer, variables, feature_map)
    np.testing.assert_allclose(
        eval_out, apply(layer.clone(query_chunk_size=None), variables, feature_map),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    a = apply(layer, variables, feature_map, train=True, rngs={"dropout": jax.random.key(1)})
    b = apply(layer, variables, feature_map, train=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, eval_out)


def test_jit_equals_eager_and_pmap_devices_agree(feature_map):
    layer = make_layer(num_heads=2, qkv_features=8, max_area_height=2, max_area_width=2)
    variables = init_layer(layer, feature_map, 0)
    eager = layer.apply(variables, feature_map, train=False)
    jitted = jax.jit(lambda v, x: layer.apply(v, x, train=False))(variables, feature_map)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)

    assert jax.local_device_count() == 2
    replicated = jax_utils.replicate(variables)
    stacked = jnp.stack([feature_map, feature_map[::-1]])  # [devices, batch, H, W, C]
    out = jax.pmap(lambda v, x: layer.apply(v, x, train=False))(replicated, stacked)
    out = np.asarray(out)
    np.testing.assert_allclose(out[0], eager, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1], np.asarray(eager)[::-1], rtol=1e-5, atol=1e-6)
    # Same input on both devices → bit-identical results.
    same = jax.pmap(lambda v, x: layer.apply(v, x, train=False))(
        replicated, jnp.stack([feature_map, feature_map])
    )
    np.testing.assert_array_equal(np.asarray(same)[0], np.asarray(same)[1])


def test_bfloat16_close_to_float32(feature_map):
    layer = make_layer(num_heads=2, qkv_features=8, max_area_height=3, max_area_width=3)
    variables = init_layer(layer, feature_map, 0)
    f32 = apply(layer, variables, feature_map)
    bf16 = apply(layer.clone(dtype=jnp.bfloat16), variables, feature_map)
    assert bf16.dtype == jnp.bfloat16
    scale = float(np.abs(np.asarray(f32)).max())
    np.testing.assert_allclose(np.asarray(bf16, np.float32), f32, atol=3e-2 * scale)


def test_cost_model_counts():
    cost = aa.area_attention_cost(
        9, 49, max_height=3, max_width=3, num_heads=4, depth_per_head=64, query_chunk_size=100
    )
    assert cost["queries"] == 441
    assert cost["areas"] == 3456
    assert cost["weight_elements"] == 441 * 3456 * 4
    assert cost["live_weight_elements"] == 100 * 3456 * 4
    assert cost["area_feature_elements"] == 2 * 3456 * 256
    # The N·A contractions dominate: 4·N·A·heads·d of the total.
    assert 4 * 441 * 3456 * 256 <= cost["flops"] <= 1.1 * 4 * 441 * 3456 * 256


def test_cost_model_flops_agree_with_xla():
    x = jnp.zeros((1, 9, 20, 16), jnp.float32)
    layer = make_layer(num_heads=2, qkv_features=32, max_area_height=3, max_area_width=3)
    variables = init_layer(layer, x, 0)
    compiled = jax.jit(lambda v, x: layer.apply(v, x, train=False)).lower(variables, x).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older JAX returned one dict per device
        analysis = analysis[0]
    xla_flops = float(analysis["flops"])
    ours = aa.area_attention_cost(
        9, 20, max_height=3, max_width=3, num_heads=2, depth_per_head=16, in_channels=16
    )["flops"]
    assert 0.7 < xla_flops / ours < 1.4, (xla_flops, ours)


def test_maps_smaller_than_the_largest_area_never_nan():
    layer = make_layer(num_heads=2, max_area_height=3, max_area_width=3)
    key = jax.random.key(0, impl="rbg")
    init = jax.jit(lambda x: layer.init(key, x, train=False))
    apply = jax.jit(lambda v, x: layer.apply(v, x, train=False))
    for height, width in ((1, 1), (2, 4)):
        x = jax.random.normal(jax.random.key(height * 10 + width), (1, height, width, 4))
        out = apply(init(x), x)
        assert out.shape == (1, height, width, 4)
        assert np.all(np.isfinite(out))


def test_query_chunk_size_for_budget():
    # 9×49 map, 3×3 areas: A = 3456; 4 heads, batch 32, float32 → 1,769,472 bytes per query.
    per_query = 3456 * 4 * 32 * 4
    kwargs = {"max_height": 3, "max_width": 3, "num_heads": 4, "batch_size": 32}
    assert aa.query_chunk_size_for_budget(9, 49, budget_bytes=441 * per_query, **kwargs) is None
    assert aa.query_chunk_size_for_budget(9, 49, budget_bytes=100.5 * per_query, **kwargs) == 100
    assert aa.query_chunk_size_for_budget(9, 49, budget_bytes=1.0, **kwargs) == 1
