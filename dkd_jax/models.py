"""Flax MACNN: the head-fusion attention CNN of the DKDFMH lineage, its presets and its sizes.

This module owns the network (paper_spec §2.1, a layer-for-layer port of the lineage's PyTorch
``MACNN``), the teacher/student presets (§2.3) and the arithmetic of its feature-map sizes. The
multi-scale area attention it can use instead of head fusion lives in
:mod:`dkd_jax.area_attention`.

Layout is NHWC: input ``[batch, freq, time, 1]`` (freq = mel bands or cepstra). The trunk:

=====  ===============================================================  ==========================
 #      layer                                                            output (40×200 input)
=====  ===============================================================  ==========================
 1a     conv 10×2, 1→8, pad (4, 0); BatchNorm; ReLU                      [B, 39, 199, 8]
 1b     conv 2×8, 1→8, pad (0, 3); BatchNorm; ReLU (parallel to 1a)      [B, 39, 199, 8]
 cat    concat 1a, 1b on channels                                        [B, 39, 199, 16]
 2      conv 3×3 →32 pad 1; BN; ReLU; max-pool 2×2 VALID                 [B, 19, 99, 32]
 3      conv 3×3 →48 pad 1; BN; ReLU; max-pool 2×2 VALID                 [B, 9, 49, 48]
 4      conv 3×3 →64 pad 1; BN; ReLU                                     [B, 9, 49, 64]
 5      conv 3×3 →80 pad 1; BN; ReLU                                     [B, 9, 49, 80]
=====  ===============================================================  ==========================

then either **head fusion** (``attention="head_fusion"``, the lineage): per head ``i`` 1×1 convs
(with bias) Q_i, K_i, V_i: 80→d, ``O_i = softmax_channels(Q_i ⊙ K_i) ⊙ V_i`` (element-wise product,
softmax over the d channels at every time–frequency point), heads concatenated along height, ReLU,
global average pool → ``[B, d]`` (identical to the mean over heads of each head's pooled
``ReLU(O_i)``), linear d→classes; or **area attention** (``attention="area"``): multi-scale area
self-attention over the 80-channel map (heads × d features, see :mod:`dkd_jax.area_attention`),
ReLU, global average pool → ``[B, heads·d]``, linear → classes. There is no dropout except the
optional attention-weight dropout of area attention (training only).

BatchNorm is PyTorch-equivalent (``momentum=0.9`` in Flax's convention = PyTorch's 0.1,
``epsilon=1e-5``); batch statistics are used and updated only with ``train=True``. One difference
remains: PyTorch updates the running variance with the unbiased batch variance, Flax with the
biased one, a relative difference of ``1/(n−1)`` with ``n`` = batch × height × width of the
layer's input. It is largest at bn4/bn5, which sit after the second pool: at batch 32 on a
26×63 MFCC segment ``n`` = 32·6·15 = 2,880 there, a factor of 3.5e-4 (on 40×200 log-mel,
32·9·49: 7.1e-5).

Initialisation: ``init_scheme="pytorch"`` (default) draws conv/linear kernels from
kaiming-uniform(a=√5), i.e. ``U(−1/√fan_in, 1/√fan_in)`` (gain √(2/(1+a²)) = √(1/3),
bound = gain·√(3/fan_in)), and biases from the same ``U(−1/√fan_in, 1/√fan_in)``; it is the default
because every number the lineage published was trained from that initialisation (parity first).
``init_scheme="flax"`` uses the Flax defaults (lecun-normal kernels, whose standard deviation is √3
times larger, and zero biases).

``dtype=jnp.bfloat16`` computes in bfloat16 with float32 parameters; BatchNorm statistics, softmax,
pooling and the returned logits are float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dkd_jax import area_attention, conv_taps
from dkd_jax import config as config_lib

Array = jax.Array

#: Channels of the trunk's last convolution (the map the attention reads).
TRUNK_CHANNELS = 80
#: The two parallel first convolutions: (kernel (freq, time), padding ((f, f), (t, t))).
FIRST_CONVS = {
    "conv1a": ((10, 2), ((4, 4), (0, 0))),
    "conv1b": ((2, 8), ((0, 0), (3, 3))),
}
#: Channels of each first convolution (concatenated to 16).
FIRST_CONV_CHANNELS = 8
#: The 3×3 stages (padding 1): (name, channels, followed by a 2×2 VALID max-pool).
STAGES = (("conv2", 32, True), ("conv3", 48, True), ("conv4", 64, False), ("conv5", 80, False))
ATTENTION_TYPES = ("head_fusion", "area")
INIT_SCHEMES = ("pytorch", "flax")
#: How the trunk's convolutions are computed (``MACNN.conv_algorithm``).
CONV_ALGORITHMS = conv_taps.ALGORITHMS
_BN_MOMENTUM = 0.9  # Flax convention: new = momentum * old + (1 - momentum) * batch (PyTorch 0.1)
_BN_EPSILON = 1e-5

#: Named model sizes. ``build_model(name, **overrides)`` turns one into a :class:`MACNN`.
#:
#: * ``student``: the lineage's tuned head-fusion MACNN, 4 heads × 64 (155,636 parameters, 4
#:   classes).
#: * ``teacher``: head fusion with the ``MACNN`` class defaults, 8 heads × 256 (591,860).
#: * ``area_teacher``: spec §2.3 option 2, a multi-scale area-attention teacher for the head-fusion
#:   student. Same trunk; 3×3 areas (the area-attention paper's best setting), learned q/k/v
#:   projections, 4 heads × 64 (156,404 parameters). It matches the student's attention width and
#:   size on purpose, so teacher and student differ in the *scale* of the attention set, not in
#:   capacity (widen with ``attention_heads=`` / ``attention_hidden=``; memory grows with the
#:   heads, see :mod:`dkd_jax.area_attention`). Weight dropout 0.5 as in the lineage, training only.
#: * ``tiny``: 2 heads × 8, for tests and smoke runs.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "student": {"attention": "head_fusion", "attention_heads": 4, "attention_hidden": 64},
    "teacher": {"attention": "head_fusion", "attention_heads": 8, "attention_hidden": 256},
    "area_teacher": {
        "attention": "area",
        "attention_heads": 4,
        "attention_hidden": 64,
        "area_max_height": 3,
        "area_max_width": 3,
        "area_projection": True,
        "area_dropout": 0.5,
    },
    "tiny": {"attention": "head_fusion", "attention_heads": 2, "attention_hidden": 8},
}


def _conv_output(size: int, kernel: int, pad: tuple[int, int]) -> int:
    return size + pad[0] + pad[1] - kernel + 1


def feature_map_size(freq: int, time: int) -> tuple[int, int]:
    """Height and width of the trunk's output (the map the attention sees) for a given input.

    Args:
      freq: input height (mel bands or cepstra).
      time: input width (frames).

    Returns:
      ``(height, width)``; either may be ≤ 0 when the input is too small (see
      :func:`minimum_input_size`).
    """
    sizes = set()
    for kernel, (pad_f, pad_t) in FIRST_CONVS.values():
        sizes.add((_conv_output(freq, kernel[0], pad_f), _conv_output(time, kernel[1], pad_t)))
    if len(sizes) != 1:  # pragma: no cover - guards an edit of FIRST_CONVS
        raise AssertionError(f"models: the two first convolutions disagree in size: {sizes}")
    height, width = sizes.pop()
    for _, _, pool in STAGES:
        if pool:
            height, width = height // 2, width // 2
    return height, width


def minimum_input_size() -> tuple[int, int]:
    """The smallest ``(freq, time)`` input the network accepts (every pool keeps ≥ 1 row/column).

    Derived from the layer arithmetic: each 2×2 VALID pool needs ≥ 2 rows, so the first
    convolutions must leave ``2**pools`` rows and columns; they change the size by
    ``pad_before + pad_after − kernel + 1``.

    Returns:
      ``(min_freq, min_time)``; ``(5, 5)`` for the lineage's layers.
    """
    pools = sum(pool for _, _, pool in STAGES)
    need = 2**pools
    kernel, (pad_f, pad_t) = FIRST_CONVS["conv1a"]
    min_freq = need - (pad_f[0] + pad_f[1] - kernel[0] + 1)
    min_time = need - (pad_t[0] + pad_t[1] - kernel[1] + 1)
    return max(min_freq, 1), max(min_time, 1)


def count_parameters(params: Any) -> int:
    """Total number of parameter entries in a pytree (e.g. ``variables["params"]``)."""
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params)))


def _uniform(bound: float) -> Callable[..., Array]:
    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


def layer_initializers(scheme: str, fan_in: int) -> tuple[Callable[..., Array], ...]:
    """Kernel and bias initializers of a conv/linear layer with the given fan-in.

    Args:
      scheme: ``"pytorch"`` (kaiming-uniform(a=√5) kernels and uniform biases, both
        ``U(−1/√fan_in, 1/√fan_in)``) or ``"flax"`` (lecun-normal kernels, zero biases).
      fan_in: inputs per output unit (``kernel_h·kernel_w·in_channels`` for a conv).

    Returns:
      ``(kernel_init, bias_init)``.
    """
    if scheme == "pytorch":
        bound = 1.0 / math.sqrt(fan_in)
        return _uniform(bound), _uniform(bound)
    if scheme == "flax":
        return nn.initializers.lecun_normal(), nn.initializers.zeros_init()
    raise ValueError(f"models: init must be one of {INIT_SCHEMES}, got {scheme!r}")


class HeadFusionAttention(nn.Module):
    """Per-head element-wise attention of the lineage's MACNN (before fusion).

    For each head ``i``: ``O_i = softmax_d(Q_i ⊙ K_i) ⊙ V_i`` with 1×1 convs (bias) Q, K, V: C→d.
    The heads' convs are stored stacked: kernels ``[C, heads, d]``, biases ``[heads, d]``. The
    attention weights ``[batch, H, W, heads, d]`` (summing to 1 over ``d``) are sown as
    ``intermediates/attention_weights``.

    Attributes:
      num_heads: heads.
      hidden: channels d per head.
      init_scheme: initialisation scheme, see :func:`layer_initializers`.
      dtype: compute dtype (parameters float32; the softmax is float32).
    """

    num_heads: int
    hidden: int
    init_scheme: str = "pytorch"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Apply the heads.

        Args:
          x: ``[batch, H, W, C]``.

        Returns:
          ``O`` ``[batch, H, W, heads, d]`` in ``dtype``.
        """
        kernel_init, bias_init = layer_initializers(self.init_scheme, x.shape[-1])
        q, k, v = (
            nn.DenseGeneral(
                features=(self.num_heads, self.hidden),
                kernel_init=kernel_init,
                bias_init=bias_init,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=name,
            )(x)
            for name in ("query", "key", "value")
        )
        weights = jax.nn.softmax((q * k).astype(jnp.float32), axis=-1)
        self.sow("intermediates", "attention_weights", weights)
        return weights.astype(self.dtype) * v


class MACNN(nn.Module):
    """The lineage's MACNN with head-fusion (or multi-scale area) attention.

    Attributes:
      num_classes: output classes.
      attention_heads: attention heads h.
      attention_hidden: channels per head d (head fusion: also the embedding size; area attention
        with projections: per-head q/k/v depth, embedding ``h·d``).
      attention: ``"head_fusion"`` (lineage MACNN) or ``"area"`` (multi-scale area attention).
      area_max_height: largest area height (frequency), area attention only.
      area_max_width: largest area width (time), area attention only.
      area_projection: learned q/k/v projections in area attention; False uses q = k = v = the
        80-channel map split over the heads (then ``attention_hidden`` is unused and the heads must
        divide 80).
      area_dropout: attention-weight dropout of area attention, training only (``"dropout"`` rng).
      area_query_chunk_size: process area-attention queries in chunks of this size (saves memory on
        large maps, same result); None for all at once.
      batch_norm_axis_name: if set, BatchNorm averages batch statistics over this mapped axis
        (synchronised BN under ``pmap``); None keeps per-device statistics.
      init_scheme: ``"pytorch"`` (default, lineage parity) or ``"flax"``; see the module
        docstring. (Named ``init_scheme`` because a field called ``init`` would shadow
        ``nn.Module.init``; :func:`build_model` also accepts ``init=``.)
      dtype: compute dtype, ``float32`` or ``bfloat16`` (parameters stay float32).
      conv_algorithm: how the trunk's convolutions are computed: ``"xla"`` (default,
        ``lax.conv_general_dilated`` and its autodiff), ``"taps_forward"`` (the one-channel first
        convolutions' forward summed kernel tap by kernel tap) or ``"taps"`` (also the 3×3
        stages' kernel gradients); see :mod:`dkd_jax.conv_taps`. Faster on CPU; the same values
        up to float32 rounding. On CPU both taps settings also max-pool by strided slices in
        inference (as every setting does in training), where ``"xla"`` keeps ``nn.max_pool``.

    Intermediates (``apply(..., mutable=["intermediates"])``; the return value is unchanged):
    ``embedding`` ``[batch, D]`` (the pooled vector fed to the classifier), and
    ``head_fusion/attention_weights`` ``[batch, H, W, heads, d]`` or
    ``area_attention/attention_weights`` ``[batch, heads, H·W, areas]``.
    """

    num_classes: int = 4
    attention_heads: int = 4
    attention_hidden: int = 64
    attention: str = "head_fusion"
    area_max_height: int = 3
    area_max_width: int = 3
    area_projection: bool = True
    area_dropout: float = 0.0
    area_query_chunk_size: int | None = None
    batch_norm_axis_name: str | None = None
    init_scheme: str = "pytorch"
    dtype: Any = jnp.float32
    conv_algorithm: str = "xla"

    def _check_settings(self) -> Any:
        if self.attention not in ATTENTION_TYPES:
            raise ValueError(
                f"MACNN: attention must be one of {ATTENTION_TYPES}, got {self.attention!r}"
            )
        if self.init_scheme not in INIT_SCHEMES:
            raise ValueError(
                f"MACNN: init_scheme must be one of {INIT_SCHEMES}, got {self.init_scheme!r}"
            )
        for name in ("num_classes", "attention_heads", "attention_hidden"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MACNN: {name} must be ≥ 1, got {getattr(self, name)}")
        if self.attention == "area":
            if min(self.area_max_height, self.area_max_width) < 1:
                raise ValueError(
                    "MACNN: area_max_height and area_max_width must be ≥ 1, got "
                    f"{self.area_max_height}×{self.area_max_width}"
                )
            if not 0.0 <= self.area_dropout < 1.0:
                raise ValueError(f"MACNN: area_dropout must be in [0, 1), got {self.area_dropout}")
            if not self.area_projection and TRUNK_CHANNELS % self.attention_heads:
                raise ValueError(
                    f"MACNN: area_projection=False splits {TRUNK_CHANNELS} channels over the heads;"
                    f" {self.attention_heads} heads do not divide it"
                )
        if self.conv_algorithm not in CONV_ALGORITHMS:
            raise ValueError(
                f"MACNN: conv_algorithm must be one of {CONV_ALGORITHMS}, got "
                f"{self.conv_algorithm!r}"
            )
        dtype = jnp.dtype(self.dtype)
        if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"MACNN: dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype

    def _check_input(self, x: Array) -> None:
        if x.ndim != 4 or x.shape[-1] != 1:
            raise ValueError(
                f"MACNN: expected input [batch, freq, time, 1] (NHWC, one channel), got shape "
                f"{tuple(x.shape)}"
            )
        min_freq, min_time = minimum_input_size()
        freq, time = x.shape[1], x.shape[2]
        if freq < min_freq or time < min_time:
            raise ValueError(
                f"MACNN: input of {freq}×{time} (freq, time) is too small; the two 2×2 max-pools "
                f"need at least ({min_freq}, {min_time})"
            )

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        """Logits for a batch of feature maps.

        Args:
          x: ``[batch, freq, time, 1]`` features (any float dtype).
          train: BatchNorm uses (and updates, ``mutable=["batch_stats"]``) batch statistics, and
            area attention applies its weight dropout; False uses running averages.

        Returns:
          ``[batch, num_classes]`` float32 logits.

        Raises:
          ValueError: bad settings, input not ``[batch, freq, time, 1]``, or smaller than
            :func:`minimum_input_size` (raised at trace time).
        """
        dtype = self._check_settings()
        self._check_input(x)

        conv_fn = conv_taps.conv_function(self.conv_algorithm)

        def conv_bn_relu(y: Array, name: str, features: int, kernel, padding) -> Array:
            fan_in = kernel[0] * kernel[1] * y.shape[-1]
            kernel_init, bias_init = layer_initializers(self.init_scheme, fan_in)
            y = nn.Conv(
                features,
                kernel_size=kernel,
                padding=padding,
                kernel_init=kernel_init,
                bias_init=bias_init,
                dtype=dtype,
                param_dtype=jnp.float32,
                conv_general_dilated=conv_fn,
                name=name,
            )(y)
            y = nn.BatchNorm(
                use_running_average=not train,
                momentum=_BN_MOMENTUM,
                epsilon=_BN_EPSILON,
                axis_name=self.batch_norm_axis_name,
                dtype=dtype,
                param_dtype=jnp.float32,
                name="bn" + name[len("conv") :],
            )(y)
            return nn.relu(y)

        x = x.astype(dtype)
        first = [
            conv_bn_relu(x, name, FIRST_CONV_CHANNELS, kernel, padding)
            for name, (kernel, padding) in FIRST_CONVS.items()
        ]
        x = jnp.concatenate(first, axis=-1)
        for name, features, pool in STAGES:
            x = conv_bn_relu(x, name, features, (3, 3), ((1, 1), (1, 1)))
            if pool:
                # Training on CPU: the strided-slice pool with the fast gradient (measured there
                # only; GPU/TPU keep XLA's reduce_window, as benchmarked). Inference keeps
                # reduce_window with conv_algorithm="xla" (the form its exported ONNX/StableHLO
                # graphs hold, and whose evaluation earlier versions computed); the taps
                # settings, a CPU speed choice, take the strided-slice pool in inference too
                # (faster on CPU: bench/conv_algorithms.py --op inference).
                fast_pool = train or self.conv_algorithm != "xla"
                with jax.named_scope("max_pool"):  # names the ops in profiles (no numerics)
                    if fast_pool and jax.default_backend() == "cpu":
                        x = max_pool_2x2(x)
                    else:
                        x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")

        if self.attention == "head_fusion":
            heads = HeadFusionAttention(
                num_heads=self.attention_heads,
                hidden=self.attention_hidden,
                init_scheme=self.init_scheme,
                dtype=dtype,
                name="head_fusion",
            )(x)
            # Concatenating the heads along height, ReLU and global average pooling == the mean
            # over heads and positions of ReLU(O_i): one reduction over (H, W, heads).
            with jax.named_scope("embedding"):
                embedding = jnp.mean(nn.relu(heads).astype(jnp.float32), axis=(1, 2, 3))
        else:
            features = self.attention_heads * self.attention_hidden
            kernel_init, bias_init = layer_initializers(self.init_scheme, x.shape[-1])
            attended = area_attention.MultiScaleAreaAttention(
                num_heads=self.attention_heads,
                max_area_height=self.area_max_height,
                max_area_width=self.area_max_width,
                qkv_features=features if self.area_projection else None,
                use_projection=self.area_projection,
                dropout_rate=self.area_dropout,
                query_chunk_size=self.area_query_chunk_size,
                kernel_init=kernel_init,
                bias_init=bias_init,
                dtype=dtype,
                param_dtype=jnp.float32,
                name="area_attention",
            )(x, train=train)
            embedding = jnp.mean(nn.relu(attended).astype(jnp.float32), axis=(1, 2))
        self.sow("intermediates", "embedding", embedding)

        kernel_init, bias_init = layer_initializers(self.init_scheme, embedding.shape[-1])
        logits = nn.Dense(
            self.num_classes,
            kernel_init=kernel_init,
            bias_init=bias_init,
            dtype=dtype,
            param_dtype=jnp.float32,
            name="classifier",
        )(embedding.astype(dtype))
        return logits.astype(jnp.float32)


def build_model(preset: str, *, num_classes: int = 4, **overrides: Any) -> MACNN:
    """A :class:`MACNN` from a named preset, with any field overridden.

    Args:
      preset: a key of :data:`MODEL_PRESETS` (``student``, ``teacher``, ``area_teacher``, ``tiny``).
      num_classes: output classes.
      **overrides: any other :class:`MACNN` field (e.g. ``attention="area"``,
        ``dtype=jnp.bfloat16``); ``init=`` is accepted for ``init_scheme=``.

    Returns:
      The (unbound) module.

    Raises:
      ValueError: unknown preset or field.
    """
    if preset not in MODEL_PRESETS:
        raise ValueError(
            f"models.build_model: unknown preset {preset!r}; choose from {sorted(MODEL_PRESETS)}"
        )
    if "init" in overrides:  # the contract's name for init_scheme (see MACNN.init_scheme)
        if "init_scheme" in overrides:
            raise ValueError("models.build_model: give init or init_scheme, not both")
        overrides["init_scheme"] = overrides.pop("init")
    fields = set(MACNN.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"models.build_model: unknown MACNN field(s) {unknown}; valid fields: {sorted(fields)}"
        )
    kwargs: dict[str, Any] = {**MODEL_PRESETS[preset], "num_classes": num_classes, **overrides}
    return MACNN(**kwargs)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2×2 max-pool, stride 2, VALID, of ``[B, H, W, C]`` (an odd last row/column is dropped).

    The same values as ``nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")``, and the
    same gradient bit for bit: each window's whole gradient goes to its *first* maximum in
    row-major order (XLA's select-and-scatter with ``>=``; with a NaN in the window, to the
    corner that select-and-scatter picks). A window holding a NaN pools to NaN, where XLA:CPU's
    ``reduce_window`` drops NaNs (and gives -inf for a window of four); the sign of a zero
    maximum of mixed-sign zeros may differ, as ``reduce_window``'s own does between batch sizes.
    Written with strided slices (the maximum of the row pairs, then of the column pairs) and the
    gradient as a select per window corner, because on XLA:CPU ``reduce_window``'s gradient
    (select-and-scatter) runs about 3x slower than this (``bench/step_breakdown.py``) and its
    forward about 2x slower at batch 256.
    """
    return _pool_max(x)


def _even(x: jax.Array) -> jax.Array:
    _, h, w, _ = x.shape
    return x[:, : h - h % 2, : w - w % 2]


def _pool_max(x: jax.Array) -> jax.Array:
    x = _even(x)
    rows = jnp.maximum(x[:, 0::2], x[:, 1::2])
    return jnp.maximum(rows[:, :, 0::2], rows[:, :, 1::2])


def _pool_fwd(x: jax.Array):
    pooled = _pool_max(x)
    e = _even(x)
    # Which corner gets the gradient (row-major: 0 top left, 1 top right, 2 bottom left,
    # 3 bottom right), chosen as select-and-scatter chooses: walk the corners in order and move
    # on whenever not (current >= next). That is the first maximum, and with a NaN in the
    # window the same corner XLA picks (comparing with the pooled NaN would match no corner).
    best, first = e[:, 0::2, 0::2], jnp.zeros(pooled.shape, jnp.int8)
    for k, corner in ((1, e[:, 0::2, 1::2]), (2, e[:, 1::2, 0::2]), (3, e[:, 1::2, 1::2])):
        take = ~(best >= corner)
        first = jnp.where(take, jnp.int8(k), first)
        best = jnp.where(take, corner, best)
    return pooled, (first, x.shape)


def _pool_bwd(res, g: jax.Array):
    first, (b, h, w, c) = res
    zero = jnp.zeros((), g.dtype)
    corner = [jnp.where(first == k, g, zero) for k in range(4)]
    # Interleave the corners back: columns within each row of windows, then the two rows.
    top = jnp.stack(corner[:2], axis=3).reshape(b, h // 2, 2 * (w // 2), c)
    bottom = jnp.stack(corner[2:], axis=3).reshape(b, h // 2, 2 * (w // 2), c)
    dx = jnp.stack([top, bottom], axis=2).reshape(b, 2 * (h // 2), 2 * (w // 2), c)
    return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_pool_fwd, _pool_bwd)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def create_model(
    arch: config_lib.ArchConfig, *, num_classes: int, batch_norm_axis_name: str | None = None
) -> MACNN:
    """A MACNN from an architecture config (its preset plus the fields that are not None).

    Args:
      arch: ``config.model.teacher`` or ``config.model.student``.
      num_classes: output classes.
      batch_norm_axis_name: the mapped axis BatchNorm synchronises over (training under pmap).
    """
    overrides: dict[str, Any] = {
        "dtype": _DTYPES[arch.dtype],
        "conv_algorithm": arch.conv_algorithm,
    }
    for name in ("attention", "attention_heads", "attention_hidden", "init"):
        value = getattr(arch, name)
        if value is not None:
            overrides[name] = value
    if batch_norm_axis_name is not None:
        overrides["batch_norm_axis_name"] = batch_norm_axis_name
    return build_model(arch.preset, num_classes=num_classes, **overrides)


def preset_summary(presets: Mapping[str, Mapping[str, Any]] = MODEL_PRESETS) -> dict[str, int]:
    """Parameter count of every preset (4 classes), from shapes only (no computation).

    Args:
      presets: name → MACNN kwargs.

    Returns:
      name → number of parameters.
    """
    min_freq, min_time = minimum_input_size()
    x = jax.ShapeDtypeStruct((1, min_freq, min_time, 1), jnp.float32)
    counts = {}
    for name, kwargs in presets.items():
        model = MACNN(**{**kwargs, "num_classes": 4})
        shapes = jax.eval_shape(
            lambda x, model=model: model.init(jax.random.key(0), x, train=False), x
        )
        counts[name] = count_parameters(shapes["params"])
    return counts
