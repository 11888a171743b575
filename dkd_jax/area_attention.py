"""Multi-scale area attention over a time-frequency feature map (Flax Linen).

This module owns the area-attention mechanism of Xu et al., "Speech emotion recognition with
multiscale area attention and data augmentation" (ICASSP 2021), the lineage's multi-scale
attention: queries sit at every position of a ``[batch, height, width, channels]`` map, while keys
and values live on every rectangular *area* of height ``1..max_height`` and width
``1..max_width``. An area's key is the **mean** of the (projected) features it covers and its value
is their **sum**, so one attention layer looks at several scales at once. With 1×1 areas it is plain
multi-head dot-product attention.

Area enumeration (fixed order, used by the sown attention weights): area shapes in row-major
order of ``(h, w)`` for ``h = 1..min(max_height, H)``, ``w = 1..min(max_width, W)``; within one
shape, top-left corners in row-major order. Area sums come from summed-area tables (two
cumulative sums, always in float32, also on the bfloat16 path where a running sum would lose all
precision); nothing loops over positions in Python, only over the ``max_height × max_width`` area
*shapes*.

Cost, for an ``H × W`` map (``N = H·W`` queries), ``h' = min(max_height, H)`` and
``w' = min(max_width, W)``:

* areas ``A = [h'(H+1) − h'(h'+1)/2] · [w'(W+1) − w'(w'+1)/2]  ≤  N · h' · w'``
  (:func:`area_count`); e.g. 9×49 map, 3×3 → A = 24·144 = 3,456; 31×49 → 12,960.
* FLOPs per example: projections ``2·N·C·3·heads·d``; area tables ``O((H+1)(W+1)·heads·d)`` plus
  ``~4·A·heads·d`` for the two area features; logits ``2·N·A·heads·d``; softmax ``~5·N·A·heads``;
  weighted values ``2·N·A·heads·d``. The ``N·A`` terms dominate: ``≈ 4·N²·h'·w'·heads·d``.
* memory per example: the attention weights ``N·A·heads`` floats (kept for the backward pass, plus a
  same-size dropout mask when dropout is on), area keys/values ``2·A·heads·d``. With
  ``query_chunk_size=c`` the live weights shrink to ``c·A·heads`` per example (the chunk is
  recomputed in the backward pass, ``jax.checkpoint``), at the cost of a sequential loop over
  ``ceil(N / c)`` chunks. :func:`area_attention_cost` evaluates all of these.

Differences from the lineage (tensor2tensor ``dot_product_area_attention`` as called by the AACNN):

* dropout on the attention weights is applied in training only (``train=True`` with a
  ``"dropout"`` rng); the lineage applies it unconditionally, i.e. at test time too;
* logits are scaled by ``1/sqrt(depth_per_head)`` (the lineage's direct call does not scale);
* areas are genuinely 2-D (the lineage left ``memory_height`` at 1, so its "3×3" was 1×1..1×3);
* learned query/key/value projections are optional (the lineage has none: ``use_projection=False``
  gives q = k = v = the input, split over heads along channels).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Initializer = Callable[..., Array]

#: Logit given to areas excluded by the mask (replaces the logit, so it never overflows to -inf;
#: a query whose every area is masked gets uniform weights instead of NaN).
_MASKED_LOGIT = float(np.finfo(np.float32).min)


def _clip_sizes(height: int, width: int, max_height: int, max_width: int) -> tuple[int, int]:
    if min(height, width) < 1:
        raise ValueError(f"area_attention: feature map must be at least 1×1, got {height}×{width}")
    if min(max_height, max_width) < 1:
        raise ValueError(
            f"area_attention: max area size must be at least 1×1, got {max_height}×{max_width}"
        )
    return min(max_height, height), min(max_width, width)


def area_shapes(
    height: int, width: int, *, max_height: int, max_width: int
) -> list[tuple[int, int]]:
    """The area shapes ``(h, w)`` used on an ``height × width`` map, in enumeration order.

    Args:
      height: map height H (≥ 1).
      width: map width W (≥ 1).
      max_height: largest area height; clipped to H.
      max_width: largest area width; clipped to W.

    Returns:
      ``[(1, 1), (1, 2), ..., (h', w')]`` with ``h' = min(max_height, H)`` and
      ``w' = min(max_width, W)``.
    """
    mh, mw = _clip_sizes(height, width, max_height, max_width)
    return [(h, w) for h in range(1, mh + 1) for w in range(1, mw + 1)]


def area_count(height: int, width: int, *, max_height: int, max_width: int) -> int:
    """Number of areas ``A`` (keys/values) on an ``height × width`` map.

    Closed form: the count factorises over the two axes,
    ``A = [h'(H+1) − h'(h'+1)/2] · [w'(W+1) − w'(w'+1)/2]`` with ``h' = min(max_height, H)`` and
    ``w' = min(max_width, W)``.

    Args:
      height: map height H (≥ 1).
      width: map width W (≥ 1).
      max_height: largest area height.
      max_width: largest area width.

    Returns:
      The number of areas.
    """
    mh, mw = _clip_sizes(height, width, max_height, max_width)
    rows = mh * (height + 1) - mh * (mh + 1) // 2
    cols = mw * (width + 1) - mw * (mw + 1) // 2
    return rows * cols


def area_attention_cost(
    height: int,
    width: int,
    *,
    max_height: int,
    max_width: int,
    num_heads: int,
    depth_per_head: int,
    in_channels: int | None = None,
    query_chunk_size: int | None = None,
) -> dict[str, int]:
    """Analytic per-example size and cost of one area-attention layer (see the module docstring).

    Args:
      height: map height H.
      width: map width W.
      max_height: largest area height.
      max_width: largest area width.
      num_heads: attention heads.
      depth_per_head: query/key/value depth per head d.
      in_channels: input channels C when learned projections are used (adds their FLOPs), else None.
      query_chunk_size: chunk size c when queries are processed in chunks, else None.

    Returns:
      dict with ``queries`` (N), ``areas`` (A), ``weight_elements`` (``N·A·heads``),
      ``live_weight_elements`` (``min(N, c)·A·heads``), ``area_feature_elements`` (``2·A·heads·d``)
      and ``flops`` (multiply-add = 2 FLOPs; projections, area tables, logits, softmax, values).
    """
    n = height * width
    a = area_count(height, width, max_height=max_height, max_width=max_width)
    hd = num_heads * depth_per_head
    flops = 2 * n * a * hd * 2  # logits + weighted values
    flops += 5 * n * a * num_heads  # softmax (max, sub, exp, sum, div)
    flops += 2 * 2 * (height + 1) * (width + 1) * hd  # two cumulative sums, keys and values
    flops += 2 * 4 * a * hd  # four-corner combination, keys and values
    if in_channels is not None:
        flops += 2 * n * in_channels * 3 * hd
    live = n if query_chunk_size is None else min(n, query_chunk_size)
    return {
        "queries": n,
        "areas": a,
        "weight_elements": n * a * num_heads,
        "live_weight_elements": live * a * num_heads,
        "area_feature_elements": 2 * a * hd,
        "flops": flops,
    }


def query_chunk_size_for_budget(
    height: int,
    width: int,
    *,
    max_height: int,
    max_width: int,
    num_heads: int,
    batch_size: int,
    budget_bytes: float,
    bytes_per_element: int = 4,
) -> int | None:
    """Largest query chunk whose attention weights fit a memory budget (None: no chunking needed).

    Args:
      height: map height H.
      width: map width W.
      max_height: largest area height.
      max_width: largest area width.
      num_heads: attention heads.
      batch_size: examples per device step.
      budget_bytes: memory allowed for one chunk's weights (the logits, weights and dropout mask
        of a chunk are each about this size).
      bytes_per_element: 4 for float32 weights.

    Returns:
      ``None`` when all ``N`` queries fit (``N·A·heads·batch·bytes ≤ budget``), else the chunk size
      ``c ≥ 1`` with ``c·A·heads·batch·bytes ≤ budget`` (1 if even one query does not fit).
    """
    areas = area_count(height, width, max_height=max_height, max_width=max_width)
    per_query = areas * num_heads * batch_size * bytes_per_element
    queries = height * width
    if queries * per_query <= budget_bytes:
        return None
    return max(1, int(budget_bytes // per_query))


def compute_area_features(
    x: Array, *, max_height: int, max_width: int
) -> tuple[Array, Array, np.ndarray]:
    """Mean and sum of ``x`` over every area, via summed-area tables.

    Args:
      x: ``[batch, H, W, ...]`` features (any trailing shape, e.g. ``[heads, depth]``).
      max_height: largest area height (clipped to H).
      max_width: largest area width (clipped to W).

    Returns:
      ``(area_mean [batch, A, ...], area_sum [batch, A, ...], area_size [A] int)`` in float32, areas
      in the module's enumeration order.
    """
    if x.ndim < 3:
        raise ValueError(
            f"area_attention.compute_area_features: expected [batch, H, W, ...], got {x.shape}"
        )
    batch, height, width = x.shape[:3]
    rest = x.shape[3:]
    x = x.astype(jnp.float32)
    # Summed-area table with a zero first row and column: table[i, j] = sum of x[:i, :j].
    table = jnp.cumsum(jnp.cumsum(x, axis=1), axis=2)
    pad = [(0, 0), (1, 0), (1, 0)] + [(0, 0)] * len(rest)
    table = jnp.pad(table, pad)
    sums, sizes = [], []
    for h, w in area_shapes(height, width, max_height=max_height, max_width=max_width):
        bottom_right = table[:, h:, w:]
        top_right = table[:, : height + 1 - h, w:]
        bottom_left = table[:, h:, : width + 1 - w]
        top_left = table[:, : height + 1 - h, : width + 1 - w]
        area_sum = (bottom_right - top_right) - (bottom_left - top_left)
        count = (height + 1 - h) * (width + 1 - w)
        sums.append(area_sum.reshape((batch, count, *rest)))
        sizes.append(np.full((count,), h * w, dtype=np.int32))
    area_sum = jnp.concatenate(sums, axis=1)
    area_size = np.concatenate(sizes)
    area_mean = area_sum / area_size.reshape((1, -1) + (1,) * len(rest)).astype(np.float32)
    return area_mean, area_sum, area_size


def area_mask(mask: Array, *, max_height: int, max_width: int) -> Array:
    """Which areas lie entirely on valid positions.

    Args:
      mask: ``[batch, H, W]`` bool, True where the position is valid (e.g. not padding).
      max_height: largest area height.
      max_width: largest area width.

    Returns:
      ``[batch, A]`` bool, True for areas whose every position is valid.
    """
    invalid = jnp.logical_not(mask.astype(bool)).astype(jnp.float32)
    _, invalid_count, _ = compute_area_features(invalid, max_height=max_height, max_width=max_width)
    return invalid_count < 0.5


def _attend(
    query: Array,
    key: Array,
    value: Array,
    valid: Array | None,
    dropout_rate: float,
    dropout_rng: Array | None,
    dtype: Any,
) -> tuple[Array, Array]:
    """Attend one block of queries ``[B, n, heads, d]`` to all areas; returns (out, weights)."""
    logits = jnp.einsum("bqhd,bahd->bhqa", query, key, preferred_element_type=jnp.float32)
    if valid is not None:
        logits = jnp.where(valid[:, None, None, :], logits, _MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    weights = weights.astype(dtype)
    out = jnp.einsum("bhqa,bahd->bqhd", weights, value.astype(dtype))
    return out, weights


def dot_product_area_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    max_height: int,
    max_width: int,
    mask: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    query_chunk_size: int | None = None,
    dtype: Any = jnp.float32,
) -> tuple[Array, Array | None]:
    """Multi-head area attention on already-projected queries, keys and values.

    ``out[b, y, x, n] = Σ_a softmax_a(q[b, y, x, n] · mean_a(k)[n] / sqrt(d)) · sum_a(v)[n]``.

    Args:
      query: ``[batch, H, W, heads, d_k]``.
      key: ``[batch, H, W, heads, d_k]`` (area means are taken over these).
      value: ``[batch, H, W, heads, d_v]`` (area sums are taken over these).
      max_height: largest area height (clipped to H).
      max_width: largest area width (clipped to W).
      mask: optional ``[batch, H, W]`` bool, True = valid. Areas touching an invalid position get no
        weight; outputs at invalid query positions are still computed and should be ignored.
      dropout_rate: attention-weight dropout rate, applied only when ``dropout_rng`` is given.
      dropout_rng: PRNG key for the dropout, or None for deterministic attention.
      query_chunk_size: process queries in sequential chunks of this size (memory ``c·A`` instead of
        ``N·A`` per head, recomputed in the backward pass); None processes all queries at once. The
        result does not depend on it, except for which weights dropout draws.
      dtype: compute dtype of the two contractions (logits and softmax are float32).

    Returns:
      ``(out [batch, H, W, heads, d_v] dtype, weights [batch, heads, N, A] or None)``; weights are
      returned only when queries are not chunked.
    """
    if query.ndim != 5 or key.shape != query.shape or value.shape[:4] != query.shape[:4]:
        raise ValueError(
            "area_attention.dot_product_area_attention: expected query/key "
            "[batch, H, W, heads, d_k] and value [batch, H, W, heads, d_v]; "
            f"got {query.shape}, {key.shape}, {value.shape}"
        )
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"area_attention: dropout_rate must be in [0, 1), got {dropout_rate}")
    batch, height, width, heads, depth = query.shape
    valid = None
    if mask is not None:
        if mask.shape != (batch, height, width):
            raise ValueError(
                f"area_attention: mask must be [batch, H, W] = {(batch, height, width)}, "
                f"got {mask.shape}"
            )
        valid = area_mask(mask, max_height=max_height, max_width=max_width)
        # Masked areas are dropped anyway; zeroing their features first also keeps (possibly
        # large) padding values out of the summed-area tables, where they would cost precision.
        keep = mask.astype(bool)[..., None, None]
        key = jnp.where(keep, key, 0)
        value = jnp.where(keep, value, 0)
    key_area, _, _ = compute_area_features(key, max_height=max_height, max_width=max_width)
    _, value_area, _ = compute_area_features(value, max_height=max_height, max_width=max_width)
    key_area = key_area.astype(dtype)
    n = height * width
    q = (query.astype(jnp.float32) / math.sqrt(depth)).astype(dtype).reshape(batch, n, heads, depth)
    if query_chunk_size is None or query_chunk_size >= n:
        out, weights = _attend(q, key_area, value_area, valid, dropout_rate, dropout_rng, dtype)
        return out.reshape(batch, height, width, heads, -1), weights
    if query_chunk_size < 1:
        raise ValueError(f"area_attention: query_chunk_size must be ≥ 1, got {query_chunk_size}")
    num_chunks = -(-n // query_chunk_size)
    padded = num_chunks * query_chunk_size
    q = jnp.pad(q, [(0, 0), (0, padded - n), (0, 0), (0, 0)])
    q = q.reshape(batch, num_chunks, query_chunk_size, heads, depth).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(q_chunk: Array, index: Array) -> Array:
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
        out, _ = _attend(q_chunk, key_area, value_area, valid, dropout_rate, rng, dtype)
        return out

    out = jax.lax.map(lambda args: one_chunk(*args), (q, jnp.arange(num_chunks)))
    out = out.swapaxes(0, 1).reshape(batch, padded, heads, -1)[:, :n]
    return out.reshape(batch, height, width, heads, -1), None


class MultiScaleAreaAttention(nn.Module):
    """Multi-head multi-scale area self-attention over a ``[batch, H, W, C]`` map.

    Queries at every position; keys = mean and values = sum of the (projected) features over every
    area up to ``max_area_height × max_area_width``. The heads' outputs are concatenated along
    channels and optionally projected. The attention weights ``[batch, heads, N, A]`` are sown as
    ``intermediates/attention_weights`` (when not chunked).

    Attributes:
      num_heads: attention heads.
      max_area_height: largest area height (frequency axis), clipped to the map.
      max_area_width: largest area width (time axis), clipped to the map.
      qkv_features: total query/key/value width over all heads (must divide by ``num_heads``); None
        means the input channels C.
      use_projection: learned per-head query/key/value projections (``DenseGeneral`` C → heads×d);
        False uses q = k = v = the input split over heads along channels (the lineage), and then
        ``qkv_features`` must be None or C.
      use_bias: bias in the projections.
      out_features: if set, a learned output projection heads×d → out_features; None returns the
        concatenated heads.
      dropout_rate: dropout on the attention weights, training only; needs the ``"dropout"`` rng.
      query_chunk_size: see :func:`dot_product_area_attention`.
      kernel_init: initializer of projection kernels (called on the flattened ``[in, out]`` shape).
      bias_init: initializer of projection biases.
      dtype: compute dtype; parameters are ``param_dtype``.
      param_dtype: parameter dtype.
    """

    num_heads: int = 1
    max_area_height: int = 3
    max_area_width: int = 3
    qkv_features: int | None = None
    use_projection: bool = True
    use_bias: bool = True
    out_features: int | None = None
    dropout_rate: float = 0.0
    query_chunk_size: int | None = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool, mask: Array | None = None) -> Array:
        """Attend from every position to every area.

        Args:
          x: ``[batch, H, W, C]`` feature map.
          train: enables attention-weight dropout (then the ``"dropout"`` rng is required).
          mask: optional ``[batch, H, W]`` bool, True = valid position.

        Returns:
          ``[batch, H, W, out_features or heads·d]`` in ``dtype``.

        Raises:
          ValueError: bad shapes or settings, or ``train=True`` with dropout and no dropout rng.
        """
        if x.ndim != 4:
            raise ValueError(
                f"MultiScaleAreaAttention: expected [batch, H, W, C] input, got shape {x.shape}"
            )
        channels = x.shape[-1]
        features = channels if self.qkv_features is None else self.qkv_features
        if self.num_heads < 1 or features % self.num_heads:
            raise ValueError(
                f"MultiScaleAreaAttention: {features} q/k/v features do not split over "
                f"{self.num_heads} heads"
            )
        depth = features // self.num_heads
        if self.use_projection:
            projections = [
                nn.DenseGeneral(
                    features=(self.num_heads, depth),
                    use_bias=self.use_bias,
                    kernel_init=self.kernel_init,
                    bias_init=self.bias_init,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=name,
                )(x)
                for name in ("query", "key", "value")
            ]
        else:
            if features != channels:
                raise ValueError(
                    "MultiScaleAreaAttention: use_projection=False needs qkv_features None or equal"
                    f" to the input channels {channels}, got {self.qkv_features}"
                )
            split = x.astype(self.dtype).reshape((*x.shape[:3], self.num_heads, depth))
            projections = [split, split, split]
        query, key, value = projections

        dropout_rng = None
        if train and self.dropout_rate > 0.0:
            if not self.has_rng("dropout"):
                raise ValueError(
                    "MultiScaleAreaAttention: train=True with dropout_rate="
                    f"{self.dropout_rate} needs a 'dropout' rng "
                    "(apply(..., rngs={'dropout': key}))"
                )
            dropout_rng = self.make_rng("dropout")
        out, weights = dot_product_area_attention(
            query,
            key,
            value,
            max_height=self.max_area_height,
            max_width=self.max_area_width,
            mask=mask,
            dropout_rate=self.dropout_rate,
            dropout_rng=dropout_rng,
            query_chunk_size=self.query_chunk_size,
            dtype=self.dtype,
        )
        if weights is not None:
            self.sow("intermediates", "attention_weights", weights)
        out = out.reshape((*out.shape[:3], features))
        if self.out_features is not None:
            out = nn.Dense(
                self.out_features,
                use_bias=self.use_bias,
                kernel_init=self.kernel_init,
                bias_init=self.bias_init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="out",
            )(out)
        return out


def projection_parameter_count(
    in_channels: int,
    *,
    qkv_features: int | None = None,
    out_features: int | None = None,
    use_projection: bool = True,
    use_bias: bool = True,
) -> int:
    """Parameters of a :class:`MultiScaleAreaAttention` layer (independent of the map size).

    Args:
      in_channels: input channels C.
      qkv_features: total q/k/v width F (None → C).
      out_features: output projection width, or None.
      use_projection: learned q/k/v projections.
      use_bias: biases in the projections.

    Returns:
      ``3·(C·F + F·bias)`` for the projections plus ``F·O + O·bias`` for the output projection.
    """
    features = in_channels if qkv_features is None else qkv_features
    total = 3 * (in_channels * features + features * use_bias) if use_projection else 0
    if out_features is not None:
        total += features * out_features + out_features * use_bias
    return total


__all__ = [
    "MultiScaleAreaAttention",
    "area_attention_cost",
    "area_count",
    "area_mask",
    "area_shapes",
    "compute_area_features",
    "dot_product_area_attention",
    "projection_parameter_count",
    "query_chunk_size_for_budget",
]
