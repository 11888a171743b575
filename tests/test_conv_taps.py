"""Convolutions summed tap by tap (dkd_jax.conv_taps) and the model option that uses them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from dkd_jax import config as config_lib
from dkd_jax import conv_taps, models

LAYOUT = ("NHWC", "HWIO", "NHWC")


def numpy_kernel_gradient(x, dy, kernel_hw, padding):
    """float64 reference, written out tap by tap and example by example; also Σ|x|·|dy|."""
    kh, kw = kernel_hw
    x = np.pad(np.asarray(x, np.float64), ((0, 0), *padding, (0, 0)))
    dy = np.asarray(dy, np.float64)
    out_h, out_w = dy.shape[1:3]
    dw = np.zeros((kh, kw, x.shape[-1], dy.shape[-1]))
    scale = np.zeros_like(dw)
    for i in range(kh):
        for j in range(kw):
            for b in range(x.shape[0]):
                patch = x[b, i : i + out_h, j : j + out_w].reshape(-1, x.shape[-1])
                rows = dy[b].reshape(-1, dy.shape[-1])
                dw[i, j] += patch.T @ rows
                scale[i, j] += np.abs(patch).T @ np.abs(rows)
    return dw, scale


def native_vjp(x, w, dy, padding):
    def fn(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=LAYOUT)

    out, vjp = jax.vjp(fn, x, w)
    return out, *vjp(dy)


def taps_vjp(x, w, dy, padding):
    """The module's convolution as nn.Conv calls it (so both tap forms are reached)."""

    def fn(x, w):
        return conv_taps.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=LAYOUT)

    out, vjp = jax.vjp(fn, x, w)
    return out, *vjp(dy)


def numpy_forward(x, w, padding):
    """float64 convolution, tap by tap; also Σ|x|·|w| (the rounding scale)."""
    kh, kw = w.shape[:2]
    x = np.pad(np.asarray(x, np.float64), ((0, 0), *padding, (0, 0)))
    w = np.asarray(w, np.float64)
    out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    y = np.zeros((x.shape[0], out_h, out_w, w.shape[-1]))
    scale = np.zeros_like(y)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + out_h, j : j + out_w]
            y += patch @ w[i, j]
            scale += np.abs(patch) @ np.abs(w[i, j])
    return y, scale


@pytest.mark.parametrize(
    "batch, size, kernel, padding, c_in, c_out",
    [
        (4, (7, 9), (3, 3), ((1, 1), (1, 1)), 3, 5),  # a trunk stage (chunks of two)
        (3, (7, 9), (3, 3), ((1, 1), (1, 1)), 2, 4),  # odd batch: chunks of one
        (1, (4, 4), (3, 2), ((0, 2), (1, 0)), 2, 3),  # asymmetric padding, one example
        (2, (12, 6), (10, 2), ((4, 4), (0, 0)), 1, 8),  # conv1a's kernel and padding
        (2, (5, 11), (2, 8), ((0, 0), (3, 3)), 1, 8),  # conv1b's
        (3, (4, 5), (3, 2), ((0, 2), (1, 0)), 1, 3),  # one channel, asymmetric, odd batch
    ],
)
def test_values_and_gradients_against_numpy_and_jax(batch, size, kernel, padding, c_in, c_out):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *size, c_in)).astype(np.float32)
    w = rng.normal(size=(*kernel, c_in, c_out)).astype(np.float32)
    out = lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=LAYOUT)
    dy = rng.normal(size=out.shape).astype(np.float32)
    want_y, want_dx, want_dw = native_vjp(x, w, dy, padding)
    ref_y, scale_y = numpy_forward(x, w, padding)
    ref_dw, scale_dw = numpy_kernel_gradient(x, dy, kernel, padding)
    for fn in (taps_vjp, jax.jit(taps_vjp, static_argnums=3)):
        y, dx, dw = fn(x, w, dy, padding)
        assert y.shape == want_y.shape and dw.shape == w.shape and dw.dtype == jnp.float32
        assert np.all(np.abs(np.asarray(y, np.float64) - ref_y) <= 1e-6 * scale_y)
        assert np.all(np.abs(np.asarray(dw, np.float64) - ref_dw) <= 1e-6 * scale_dw + 1e-30)
        # The input gradient is always XLA's own computation, bit for bit.
        np.testing.assert_array_equal(np.asarray(dx), np.asarray(want_dx))
        if c_in == 1:  # forward summed tap by tap; the kernel gradient is XLA's
            np.testing.assert_array_equal(np.asarray(dw), np.asarray(want_dw))
        else:  # forward is XLA's; the kernel gradient summed tap by tap
            np.testing.assert_array_equal(np.asarray(y), np.asarray(want_y))
    # "taps_forward": only the one-channel forward is tap by tap; the rest is XLA's, bit for bit.
    y, dx, dw = forward_taps_vjp(x, w, dy, padding)
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(want_dx))
    np.testing.assert_array_equal(np.asarray(dw), np.asarray(want_dw))
    if c_in == 1:
        assert np.all(np.abs(np.asarray(y, np.float64) - ref_y) <= 1e-6 * scale_y)
    else:
        np.testing.assert_array_equal(np.asarray(y), np.asarray(want_y))


def forward_taps_vjp(x, w, dy, padding):
    conv = conv_taps.conv_function("taps_forward")
    out, vjp = jax.vjp(lambda x, w: conv(x, w, (1, 1), padding, dimension_numbers=LAYOUT), x, w)
    return out, *vjp(dy)


def test_conv_function_per_algorithm():
    assert conv_taps.conv_function("xla") is None
    assert conv_taps.conv_function("taps") is conv_taps.conv_general_dilated
    assert callable(conv_taps.conv_function("taps_forward"))
    with pytest.raises(ValueError, match="conv_algorithm must be one of"):
        conv_taps.conv_function("im2col")


def test_single_channel_form_refuses_more_channels():
    x, w = jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 4))
    with pytest.raises(ValueError, match="one input channel expected"):
        conv_taps.single_channel_tap_conv(x, w, ((1, 1), (1, 1)))


def test_kernel_gradient_is_at_least_as_accurate_as_xla_on_a_long_sum():
    """A trunk-sized sum (batch 64 × 25 × 62 rows): chunked accumulation keeps the float32 error
    no larger than XLA's own gradient's (measured 30× smaller at batch 256)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 25, 62, 4)).astype(np.float32)
    dy = rng.normal(size=(64, 25, 62, 6)).astype(np.float32)
    pad = ((1, 1), (1, 1))
    w = np.zeros((3, 3, 4, 6), np.float32)
    ref, scale = numpy_kernel_gradient(x, dy, (3, 3), pad)
    ours = np.asarray(jax.jit(conv_taps.kernel_gradient, static_argnums=(2, 3))(x, dy, (3, 3), pad))
    xla = np.asarray(jax.jit(native_vjp, static_argnums=3)(x, w, dy, pad)[2])
    err_ours = np.max(np.abs(ours - ref) / scale)
    err_xla = np.max(np.abs(xla - ref) / scale)
    assert err_ours <= err_xla * 1.01 + 1e-12, (err_ours, err_xla)
    assert err_ours < 1e-7


def test_bfloat16_kernel_gradient_keeps_the_dtype_and_is_close():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(4, 6, 6, 3)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 2)), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(4, 6, 6, 2)), jnp.bfloat16)
    _, _, dw = taps_vjp(x, w, dy, ((1, 1), (1, 1)))
    assert dw.dtype == jnp.bfloat16
    ref, scale = numpy_kernel_gradient(
        np.asarray(x, np.float32), np.asarray(dy, np.float32), (3, 3), ((1, 1), (1, 1))
    )
    assert np.all(np.abs(np.asarray(dw, np.float64) - ref) <= 1e-2 * scale)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"window_strides": (2, 2)}, "strides (2, 2)"),
        ({"rhs_dilation": (2, 1)}, "kernel dilation (2, 1)"),
        ({"lhs_dilation": (1, 2)}, "input dilation (1, 2)"),
        ({"padding": "SAME"}, "padding 'SAME'"),
        ({"padding": ((-1, 0), (0, 0))}, "non-negative"),
        ({"feature_group_count": 2}, "feature_group_count=2"),
        ({"dimension_numbers": ("NCHW", "OIHW", "NCHW")}, "NHWC/HWIO"),
        ({"precision": lax.Precision.HIGHEST}, "precision="),
    ],
)
def test_unsupported_convolutions_are_refused_by_name(kwargs, named):
    x, w = jnp.zeros((2, 6, 6, 2)), jnp.zeros((3, 3, 2, 2))
    args = {
        "window_strides": (1, 1),
        "padding": ((1, 1), (1, 1)),
        "dimension_numbers": LAYOUT,
        **kwargs,
    }
    with pytest.raises(ValueError, match="stride-1 2-D NHWC") as error:
        conv_taps.conv_general_dilated(x, w, **args)
    assert named in str(error.value)


def _everything(model):
    """One compiled function: eval logits, train logits + batch stats, loss and gradients."""

    def fn(variables, x, y):
        def loss(params):
            logits, updated = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (
                logits,
                updated,
            )

        (value, train_out), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        return model.apply(variables, x, train=False), train_out, value, grads

    return jax.jit(fn)


@pytest.mark.parametrize("algorithm", ["taps_forward", "taps"])
def test_model_option_matches_xla_to_float_rounding(algorithm):
    """conv_algorithm="taps_forward" and "taps" against "xla" (every convolution is the same
    in every preset, so the small one): same parameters, logits (eval and train mode), batch
    statistics, loss and gradients equal to float32 rounding. The conv biases ahead of
    BatchNorm have an analytic gradient of zero (BN removes a constant shift), so they are held
    to the scale of their layer's kernel gradient."""
    xla = models.build_model("tiny")
    taps = models.build_model("tiny", conv_algorithm=algorithm)
    x = jax.random.normal(jax.random.key(0), (6, 16, 24, 1))
    y = jnp.arange(6) % 4
    shapes = jax.eval_shape(lambda: xla.init(jax.random.key(1), x[:1], train=False))
    assert jax.eval_shape(lambda: taps.init(jax.random.key(1), x[:1], train=False)) == shapes
    rng = np.random.default_rng(3)
    variables = jax.tree.map(
        lambda s: (
            rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
            if s.ndim == 1
            else rng.normal(0.0, 0.3, s.shape).astype(np.float32)
        ),
        shapes,
    )
    eval_a, train_a, loss_a, grads_a = _everything(xla)(variables, x, y)
    eval_b, train_b, loss_b, grads_b = _everything(taps)(variables, x, y)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(v, u, rtol=1e-4, atol=1e-5),
        (eval_a, train_a),
        (eval_b, train_b),
    )
    np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-6)
    flat_b = dict(jax.tree_util.tree_flatten_with_path(grads_b)[0])
    for path, ga in jax.tree_util.tree_flatten_with_path(grads_a)[0]:
        layer, leaf = path[0].key, path[-1].key
        scale = float(jnp.abs(ga).max())
        if layer.startswith("conv") and leaf == "bias":
            scale = float(jnp.abs(grads_a[layer]["kernel"]).max())
        np.testing.assert_allclose(
            flat_b[path], ga, rtol=1e-3, atol=1e-4 * scale, err_msg=str(path)
        )


def test_the_option_travels_from_the_config_and_bad_values_are_named():
    arch = config_lib.ArchConfig(preset="student", conv_algorithm="taps")
    assert models.create_model(arch, num_classes=4).conv_algorithm == "taps"
    assert models.create_model(config_lib.ArchConfig(), num_classes=4).conv_algorithm == "xla"
    bad = models.build_model("student", conv_algorithm="im2col")
    with pytest.raises(ValueError, match="conv_algorithm must be one of"):
        bad.init(jax.random.key(0), jnp.zeros((1, 26, 63, 1)), train=False)
    # A config written before the option existed still loads, with the bit-exact default.
    cfg = config_lib.get_config("default")
    as_dict = config_lib.to_dict(cfg)
    del as_dict["model"]["student"]["conv_algorithm"]
    assert config_lib.from_dict(as_dict).model.student.conv_algorithm == "xla"


def test_export_traces_a_taps_model_with_standard_convolutions():
    """A model trained with taps exports (ONNX, StableHLO) as plain convolutions."""
    from dkd_jax import export

    model = models.build_model("tiny", conv_algorithm="taps")
    x = jnp.zeros((2, 16, 24, 1))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1], train=False))
    variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.1, s.dtype), variables)
    fn = export.inference_function(model, variables)
    primitives = {str(e.primitive) for e in jax.make_jaxpr(fn)(x).jaxpr.eqns}
    assert "conv_general_dilated" in primitives
    assert not any("custom_vjp" in p for p in primitives), primitives
    plain = export.inference_function(models.build_model("tiny"), variables)
    # Eager on purpose: jitted, the constant (splat) conv kernels closed over here give NaN or
    # run-to-run different logits on XLA:CPU (jax 0.10.2; random-valued kernels are exact).
    np.testing.assert_array_equal(np.asarray(fn(x)), np.asarray(plain(x)))


def test_taps_settings_pool_by_strided_slices_in_inference_on_cpu():
    """ "xla" inference keeps nn.max_pool (reduce_window: what exports and earlier versions
    hold); the taps settings use the strided-slice pool there too, as every setting does in
    training on CPU."""
    x = jnp.zeros((2, 16, 24, 1))

    def primitives(algorithm, train):
        model = models.build_model("tiny", conv_algorithm=algorithm)
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
        kw = {"mutable": ["batch_stats"]} if train else {}
        jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=train, **kw))(variables)
        return {str(e.primitive) for e in jaxpr.jaxpr.eqns}

    assert jax.default_backend() == "cpu"
    assert "reduce_window_max" in primitives("xla", train=False)
    for algorithm in ("taps_forward", "taps"):
        assert "reduce_window_max" not in primitives(algorithm, train=False)
    assert "reduce_window_max" not in primitives("xla", train=True)


def test_mismatch_names_the_settings_measured_slower():
    assert conv_taps.mismatch("xla", "cpu", 1) is None
    assert conv_taps.mismatch("xla", "gpu", 8) is None
    assert conv_taps.mismatch("taps", "cpu", 1) is None
    assert conv_taps.mismatch("taps_forward", "cpu", 2) is None
    assert "written for the CPU" in conv_taps.mismatch("taps_forward", "gpu", 1)
    assert "'taps_forward' keeps" in conv_taps.mismatch("taps", "cpu", 2)
