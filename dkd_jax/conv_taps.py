"""Convolutions written kernel tap by kernel tap, where XLA:CPU's own are slow.

Two pieces of the MACNN trunk run far slower under XLA:CPU than in PyTorch (oneDNN), measured
per layer at batch 256, 26×63, one thread (``bench/step_breakdown.py``):

* the **kernel gradient** ``dw`` of the 3×3 stages: 130 ms against 42 ms for ``conv2``;
* the **forward pass of the two first convolutions**, which have a single input channel:
  34 ms against 3 ms for ``conv1a`` (10×2 kernel), although they are a few multiply-adds.

Both are sums over kernel taps ``(i, j)``:

    y[b, h, w]  = Σ_ij x_pad[b, h + i, w + j] · w[i, j]          (forward, C_in = 1)
    dw[i, j]    = Σ_bhw x_pad[b, h + i, w + j]ᵀ · dy[b, h, w]     (kernel gradient)

and written that way here: the forward as ``kh·kw`` shifted multiply-adds that XLA fuses into
one loop (17× faster for ``conv1a``), the kernel gradient as one ``[C_in, rows] @ [rows,
C_out]`` product per tap over two examples at a time (a ``lax.scan`` over the batch keeps the
slices in cache; 1.6-2.5× faster; materialising all patches at once is slower than XLA).
Everything else stays XLA's own: the forward pass of multi-channel convolutions, every input
gradient, and the single-channel convolutions' kernel gradients (all as fast as PyTorch's).

The mathematics is the same; the float summation order is not, so results agree with XLA's to
float32 rounding (the kernel gradient is *more* accurate than XLA's over long sums: chunked
accumulation), not bit for bit. That is why this is opt-in, as ``ArchConfig.conv_algorithm``:
the default ``"xla"`` keeps ``python -m dkd_jax.experiment reproduce`` bit-exact for runs made
before; ``"taps_forward"`` takes only the one-channel forward (faster on one CPU device and on
several: ``train.py --cpu-devices``), ``"taps"`` both pieces (faster still on one CPU device,
but slower than XLA's kernel gradient when the CPU is split into several JAX devices, where the
per-tap products run slower; measured in the README). Written for CPU; on GPU/TPU the vendor
convolutions are the ones to keep.

Pure functions of arrays. :func:`conv_general_dilated` has ``lax.conv_general_dilated``'s
signature so that it plugs into ``flax.linen.Conv(conv_general_dilated=...)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

#: Layouts this module handles (Flax's NHWC activations, HWIO kernels).
_LAYOUT = ("NHWC", "HWIO", "NHWC")

#: Examples per step of the kernel-gradient scan (measured: 2 beats 1, 4, 8 and 16 at batch
#: 256 for every trunk stage; an odd batch falls back to 1).
CHUNK = 2

Padding = tuple[tuple[int, int], tuple[int, int]]


def _xla_conv(x: jax.Array, w: jax.Array, padding: Padding) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_LAYOUT)


def _output_size(x: jax.Array, w: jax.Array, padding: Padding) -> tuple[int, int]:
    (top, bottom), (left, right) = padding
    return (
        x.shape[1] + top + bottom - w.shape[0] + 1,
        x.shape[2] + left + right - w.shape[1] + 1,
    )


def _tap(x_pad: jax.Array, i: int, j: int, out_hw: tuple[int, int]) -> jax.Array:
    return x_pad[:, i : i + out_hw[0], j : j + out_hw[1], :]


# ---------------------------------------------------------------------------------------------
# Kernel gradient per tap (multi-channel stages): forward and input gradient are XLA's
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_tap_kernel_grad(x: jax.Array, w: jax.Array, padding: Padding) -> jax.Array:
    """Stride-1 NHWC × HWIO convolution; its kernel gradient is :func:`kernel_gradient`.

    Args:
      x: ``[batch, height, width, C_in]``.
      w: ``[kh, kw, C_in, C_out]``, the same dtype as ``x``.
      padding: ``((top, bottom), (left, right))``, non-negative.

    Returns:
      ``lax.conv_general_dilated(x, w, (1, 1), padding)``, the same values bit for bit; the
      input gradient is also XLA's (bit for bit), the kernel gradient equal up to rounding.
    """
    return _xla_conv(x, w, padding)


def _kernel_grad_fwd(x, w, padding):
    return _xla_conv(x, w, padding), (x, w)


def _kernel_grad_bwd(padding, residuals, dy):
    x, w = residuals
    _, input_vjp = jax.vjp(lambda x: _xla_conv(x, w, padding), x)
    (dx,) = input_vjp(dy)
    return dx, kernel_gradient(x, dy, w.shape[:2], padding)


conv_tap_kernel_grad.defvjp(_kernel_grad_fwd, _kernel_grad_bwd)


def kernel_gradient(x: jax.Array, dy: jax.Array, kernel_hw: tuple[int, int], padding) -> jax.Array:
    """``dw`` of a stride-1 convolution: ``Σ x_pad[b, h+i, w+j]ᵀ dy[b, h, w]`` per tap ``(i, j)``.

    Args:
      x: ``[batch, height, width, C_in]`` input of the convolution.
      dy: ``[batch, out_height, out_width, C_out]`` gradient of its output.
      kernel_hw: ``(kh, kw)``.
      padding: ``((top, bottom), (left, right))``.

    Returns:
      ``[kh, kw, C_in, C_out]`` in ``x``'s dtype (accumulated in float32).
    """
    kh, kw = kernel_hw
    batch, _, _, c_in = x.shape
    out_h, out_w, c_out = dy.shape[1:]
    chunk = CHUNK if batch % CHUNK == 0 else 1
    xs = x.reshape(batch // chunk, chunk, *x.shape[1:])
    dys = dy.reshape(batch // chunk, chunk, out_h, out_w, c_out)

    def step(acc, pair):
        xc, dyc = pair
        xp = jnp.pad(xc, ((0, 0), *padding, (0, 0)))
        dy_rows = dyc.reshape(-1, c_out)
        taps = [
            lax.dot_general(
                _tap(xp, i, j, (out_h, out_w)).reshape(-1, c_in),
                dy_rows,
                (((0,), (0,)), ((), ())),
                preferred_element_type=jnp.float32,
            )
            for i in range(kh)
            for j in range(kw)
        ]
        return acc + jnp.stack(taps), None

    acc = jnp.zeros((kh * kw, c_in, c_out), jnp.float32)
    acc, _ = lax.scan(step, acc, (xs, dys))
    return acc.reshape(kh, kw, c_in, c_out).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Forward per tap (one input channel): gradients are XLA's
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def single_channel_tap_conv(x: jax.Array, w: jax.Array, padding: Padding) -> jax.Array:
    """Stride-1 convolution of a one-channel input, as ``kh·kw`` shifted multiply-adds.

    Args:
      x: ``[batch, height, width, 1]``.
      w: ``[kh, kw, 1, C_out]``, the same dtype as ``x``.
      padding: ``((top, bottom), (left, right))``, non-negative.

    Returns:
      ``[batch, out_height, out_width, C_out]``, equal to ``lax.conv_general_dilated`` up to
      float rounding (summed tap by tap in row-major order, in ``x``'s dtype). Both gradients are
      XLA's own convolution gradients (its kernel gradient is fast for one input channel).
    """
    return _single_channel_forward(x, w, padding)


def _single_channel_forward(x, w, padding):
    if x.shape[-1] != 1 or w.shape[2] != 1:
        raise ValueError(
            f"conv_taps.single_channel_tap_conv: one input channel expected, got input "
            f"{tuple(x.shape)} and kernel {tuple(w.shape)}"
        )
    out_hw = _output_size(x, w, padding)
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    y = _tap(xp, 0, 0, out_hw) * w[0, 0, 0]
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            if i or j:
                y = y + _tap(xp, i, j, out_hw) * w[i, j, 0]
    return y


def _single_channel_fwd(x, w, padding):
    return _single_channel_forward(x, w, padding), (x, w)


def _single_channel_bwd(padding, residuals, dy):
    x, w = residuals
    _, vjp = jax.vjp(lambda x, w: _xla_conv(x, w, padding), x, w)
    return vjp(dy)


single_channel_tap_conv.defvjp(_single_channel_fwd, _single_channel_bwd)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
    *,
    tap_kernel_grad: bool = True,
) -> jax.Array:
    """``lax.conv_general_dilated`` for ``nn.Conv``, computed tap by tap.

    One input channel: :func:`single_channel_tap_conv`; more: :func:`conv_tap_kernel_grad`,
    or XLA's own convolution when ``tap_kernel_grad`` is False (``conv_algorithm=
    "taps_forward"``). Only what the MACNN trunk uses is accepted (2-D, stride 1, no dilation,
    one feature group, explicit padding, NHWC/HWIO, default precision); anything else raises
    ``ValueError`` rather than silently computing something else.
    """
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _LAYOUT)
    problems = []
    if lhs.ndim != 4 or dn != expected:
        problems.append(f"layout {dimension_numbers} of a {lhs.ndim}-D input (need 2-D NHWC/HWIO)")
    if tuple(window_strides) != (1, 1):
        problems.append(f"strides {tuple(window_strides)}")
    for name, dilation in (("input", lhs_dilation), ("kernel", rhs_dilation)):
        if dilation is not None and tuple(dilation) != (1, 1):
            problems.append(f"{name} dilation {tuple(dilation)}")
    if feature_group_count != 1:
        problems.append(f"feature_group_count={feature_group_count}")
    if precision is not None:
        problems.append(f"precision={precision}")
    if isinstance(padding, str) or any(min(p) < 0 for p in padding):
        problems.append(f"padding {padding!r} (need explicit non-negative pairs)")
    if problems:
        raise ValueError(
            "conv_taps.conv_general_dilated supports stride-1 2-D NHWC convolutions only; got "
            + ", ".join(problems)
        )
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if lhs.shape[-1] == 1:
        return single_channel_tap_conv(lhs, rhs, pads)
    if tap_kernel_grad:
        return conv_tap_kernel_grad(lhs, rhs, pads)
    return _xla_conv(lhs, rhs, pads)


#: ``MACNN.conv_algorithm`` values: how :func:`conv_function` computes the trunk.
ALGORITHMS = ("xla", "taps_forward", "taps")


def conv_function(algorithm: str):
    """The ``conv_general_dilated`` argument of ``nn.Conv`` for a ``conv_algorithm``.

    ``"xla"``: None (Flax's default, ``lax.conv_general_dilated``); ``"taps_forward"``: the
    one-channel convolutions' forward tap by tap, everything else XLA's; ``"taps"``: also the
    multi-channel kernel gradients tap by tap.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"conv_algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "xla":
        return None
    if algorithm == "taps":
        return conv_general_dilated
    return _forward_taps_only


def _forward_taps_only(*args, **kwargs) -> jax.Array:
    return conv_general_dilated(*args, **kwargs, tap_kernel_grad=False)


def mismatch(algorithm: str, platform: str, num_devices: int) -> str | None:
    """Why ``algorithm`` is a measured poor fit for training on these devices, or None.

    Any taps setting off the CPU (written for XLA:CPU; the vendor convolutions are the ones to
    keep), and ``"taps"`` on several CPU devices (its per-tap kernel gradients run slower than
    XLA's there: ``bench/conv_algorithms.py --cpu-devices 2``).
    """
    if algorithm != "xla" and platform != "cpu":
        return (
            f"conv_algorithm={algorithm!r} is written for the CPU; on {platform} XLA's own "
            "convolutions ('xla') are usually faster"
        )
    if algorithm == "taps" and num_devices > 1:
        return (
            f"conv_algorithm='taps' on {num_devices} CPU devices: its kernel gradients were "
            "measured slower than XLA's there; 'taps_forward' keeps the part that is faster "
            "(README: Speed against PyTorch)"
        )
    return None
