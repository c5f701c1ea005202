"""Graph-convolutional blind denoiser (Chen et al., ICONIP 2020) + control.

Chen et al. ("Low-Dose CT Image Blind Denoising with Graph Convolutional
Networks") build on GCDN (Valsesia et al., IEEE TIP 2020): each block adds to
a local 3x3 convolution a NON-LOCAL graph convolution over a k-nearest-
neighbour graph computed from the block's own input features, so that a
pixel can average with similar pixels anywhere in a search window, not only
with its neighbours. ``knn_graph`` builds the graph (not differentiated: the
choice of neighbours is discrete), ``GraphConv`` is GCDN's lightweight
edge-conditioned convolution, ``GCNDenoiser`` the residual network, and
``LocalCNN`` the ablation control that makes every graph convolution local at
equal depth and parameter count, to test whether the non-local part helps.

Both the graph search and the per-edge network run in chunks of image rows
(rematerialised in the backward pass), so whole 512x512 slices fit in memory.
The formulas, the choices made where the papers leave room, and the measured
cost, parameter counts and variants are in docs/gcn.md.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from ldct_jax.models.layers import Conv

Array = jax.Array
Graph = Tuple[Array, Array]

# Byte budget of one chunk's candidate-distance buffer in ``knn_graph``.
# 64 MiB keeps a 512x512 slice with a 49x49 window at 13 rows per chunk.
KNN_CHUNK_BYTES = 64 << 20
# Byte budget of one chunk's per-edge activations in ``GraphConv``. Small
# chunks keep the per-edge GEMM outputs (E x r (C_in + 1), written once and
# read once: memory-bound) in cache. Measured fwd+bwd of the default TDDL
# GCN (16 ch, 2 blocks, k 8, window 11) on 16x32x32, 2 idle cores: 0.70 s
# in one chunk (512 MiB budget), 0.57 s in chunks of 4 rows (32 MiB) or 1
# row (8 MiB); and far fewer temporaries.
EDGE_CHUNK_BYTES = 32 << 20
# Guards the local label scales against 0 / 0 when all k neighbours equal the
# pixel; far below the smallest spreads measured in a trained net (~2e-7).
LABEL_SPREAD_EPS = 1e-12


def _check_window(k: int, search_window: int, exclude_radius: int, height: int,
                  width: int) -> None:
  """Raises unless every pixel, corners included, has >= k candidates."""
  if search_window < 1 or search_window % 2 == 0:
    raise ValueError(f"search_window must be odd and positive, got "
                     f"{search_window}")
  if exclude_radius < 0:
    raise ValueError(f"exclude_radius must be >= 0, got {exclude_radius}")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  radius = search_window // 2
  # A corner pixel sees the fewest candidates: one quadrant of the window.
  window = (min(radius, height - 1) + 1) * (min(radius, width - 1) + 1)
  local = ((min(exclude_radius, radius, height - 1) + 1)
           * (min(exclude_radius, radius, width - 1) + 1))
  if window - local < k:
    raise ValueError(
        f"k={k} neighbours requested, but a corner pixel of a {height}x{width} "
        f"image has only {window - local} candidates in a {search_window}x"
        f"{search_window} window outside the local radius {exclude_radius}")


def _balanced_rows(height: int, max_rows: int) -> int:
  """Rows per chunk: fewest chunks of at most ``max_rows``, evenly filled.

  E.g. 64 rows at most 20 a chunk -> 4 chunks of 16, not 4 of 20 with 16
  rows of padding computed for nothing.
  """
  chunks = -(-height // max(1, min(max_rows, height)))
  return -(-height // chunks)


def _split_rows(x: Array, rows: int) -> Array:
  """``(B, H, ...)`` -> ``(ceil(H / rows), B, rows, ...)``, zero-padded rows."""
  chunks = -(-x.shape[1] // rows)
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, chunks * rows - x.shape[1])
  x = jnp.pad(x, pad)
  x = x.reshape((x.shape[0], chunks, rows) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _merge_rows(x: Array, height: int) -> Array:
  """Inverse of ``_split_rows``: ``(n, B, rows, ...)`` -> ``(B, height, ...)``.
  """
  x = jnp.moveaxis(x, 0, 1)
  x = x.reshape((x.shape[0], -1) + x.shape[3:])
  return x[:, :height]


def knn_graph(features: Array, k: int, search_window: int,
              exclude_radius: int = 1,
              chunk_rows: Optional[int] = None) -> Graph:
  """Non-local k-nearest-neighbour graph within a search window.

  Args:
    features: ``(B, H, W, C)`` feature maps.
    k: neighbours per pixel.
    search_window: odd side of the square window centred on each pixel;
      candidates have ``|dy|, |dx| <= search_window // 2``.
    exclude_radius: candidates with ``|dy|, |dx| <= exclude_radius`` (the
      pixel itself and its local patch, 3x3 for 1) are never chosen.
    chunk_rows: image rows whose candidate distances are computed at once;
      None picks the most that fit ``KNN_CHUNK_BYTES``. The result does not
      depend on it.

  Returns:
    ``(indices, distances)``, both ``(B, H, W, k)``: ``indices`` (int32) are
    flat indices ``y * W + x`` into the image of the k nearest candidates,
    ``distances`` (float32) their squared Euclidean feature distances
    ``sum_c (F_j - F_i)^2``, ascending along the last axis. Ties go to the
    candidate first in raster order of the window (lower dy, then lower dx).
    Both carry no gradient. Pixels outside the image are never returned.

  Raises:
    ValueError: on a bad window, or if a corner pixel has fewer than k
      candidates.
  """
  if features.ndim != 4:
    raise ValueError(f"features must be (B, H, W, C), got {features.shape}")
  batch, height, width, _ = features.shape
  _check_window(k, search_window, exclude_radius, height, width)
  size = search_window
  radius = size // 2
  if chunk_rows is None:
    row_bytes = batch * width * size * size * 4
    rows = _balanced_rows(height, KNN_CHUNK_BYTES // row_bytes)
  else:
    rows = max(1, min(int(chunk_rows), height))
  chunks = -(-height // rows)

  # Distances of identical features must be exactly zero and tiny ones must
  # not drown in rounding, so they are sums of squared differences, not
  # |a|^2 + |b|^2 - 2ab (which cancels catastrophically for close matches).
  feats = lax.stop_gradient(features).astype(jnp.float32)
  padded = jnp.pad(feats, ((0, 0), (radius, radius + chunks * rows - height),
                           (radius, radius), (0, 0)))
  offsets = np.arange(size) - radius
  local = ((np.abs(offsets)[:, None] <= exclude_radius)
           & (np.abs(offsets)[None, :] <= exclude_radius))
  cols = np.arange(width)[:, None] + offsets[None, :]  # (W, S) candidate x
  col_ok = jnp.asarray((cols >= 0) & (cols < width))

  def chunk(y0: Array) -> Graph:
    query = lax.dynamic_slice_in_dim(padded, y0 + radius, rows, axis=1)
    query = query[:, :, radius:radius + width]  # (B, rows, W, C)

    def row_offset(carry, a):
      # Rows y0 + i + a - radius of the image, all columns of the window.
      band = lax.dynamic_slice_in_dim(padded, y0 + a, rows, axis=1)
      dist = jnp.stack([
          jnp.sum(jnp.square(band[:, :, b:b + width] - query), axis=-1)
          for b in range(size)], axis=-1)  # (B, rows, W, S)
      return carry, dist

    _, dist = lax.scan(row_offset, None, jnp.arange(size))  # (S, B, r, W, S)
    dist = jnp.moveaxis(dist, 0, 3)  # (B, rows, W, S_dy, S_dx)
    cand_rows = y0 + jnp.arange(rows)[:, None] + offsets[None, :]  # (r, S)
    row_ok = (cand_rows >= 0) & (cand_rows < height)
    valid = (row_ok[:, None, :, None] & col_ok[None, :, None, :]
             & jnp.asarray(~local)[None, None])  # (rows, W, S, S)
    dist = jnp.where(valid, dist, jnp.inf).reshape(
        (batch, rows, width, size * size))
    neg_dist, slot = lax.top_k(-dist, k)
    dy = slot // size - radius
    dx = slot % size - radius
    y = (y0 + jnp.arange(rows))[None, :, None, None]
    x = jnp.arange(width)[None, None, :, None]
    return ((y + dy) * width + (x + dx)).astype(jnp.int32), -neg_dist

  if chunks == 1:
    indices, distances = chunk(jnp.int32(0))
    indices, distances = indices[:, :height], distances[:, :height]
  else:
    indices, distances = lax.map(chunk, jnp.arange(chunks) * rows)
    indices = _merge_rows(indices, height)
    distances = _merge_rows(distances, height)
  return lax.stop_gradient(indices), lax.stop_gradient(distances)


def graph_conv_param_count(in_features: int, features: int, rank: int) -> int:
  """Parameters of a ``GraphConv``: edge MLP, low-rank head, temperature."""
  hidden = in_features * in_features + in_features
  head = (in_features + 1) * rank * (in_features + features + 1)
  return hidden + head + 1


def _edge_conv_rows(params: Tuple[Array, ...], flat: Array, center: Array,
                    indices: Array, rank: int, label_scale: str) -> Array:
  """Edge-conditioned aggregation for a band of rows (see ``GraphConv``).

  Args:
    params: ``(hidden_kernel, hidden_bias, head_kernel, head_bias,
      log_temperature)``; the head's columns are ``[kappa (r), b (r x C_in),
      a (r x C_out)]``, each flattened rank-major.
    flat: ``(B, H * W, C_in)`` whole-image features (neighbour source).
    center: ``(B, rows, W, C_in)`` features of the band's pixels.
    indices: ``(B, rows, W, k)`` flat neighbour indices.
    rank: r of the low-rank Theta.
    label_scale: ``'absolute'``, ``'local'`` or ``'local_weights'`` (see
      ``GraphConv``).

  Returns:
    ``(B, rows, W, C_out)``.
  """
  hidden_kernel, hidden_bias, head_kernel, head_bias, log_temperature = params
  batch, rows, width, in_features = center.shape
  k = indices.shape[-1]
  hidden_features = hidden_kernel.shape[-1]
  out_features = head_kernel.shape[-1] // rank - in_features - 1
  split = rank * (1 + in_features)
  pixels = batch * rows * width
  # Everything per edge is a 2D (pixels * k, channels) array: XLA CPU runs
  # the GEMMs of 5D operands ~2x slower than the same GEMMs on 2D ones.
  neighbours = jax.vmap(lambda f, i: f[i])(flat, indices).reshape(
      pixels * k, in_features)
  label = neighbours - jnp.repeat(center.reshape(pixels, in_features), k,
                                  axis=0)
  squared = jnp.sum(jnp.square(label), axis=-1)  # (E,)
  if label_scale != "absolute":
    # Not differentiated, like the neighbour choice it measures: the scaled
    # labels are scale-free, as a LayerNorm'd activation is.
    spread = lax.stop_gradient(
        jnp.mean(squared.reshape(pixels, k), axis=-1) / in_features
        + LABEL_SPREAD_EPS)
    squared = squared / jnp.repeat(spread, k)
    if label_scale == "local":
      label = label * jnp.repeat(lax.rsqrt(spread), k)[:, None]
  logits = -squared / (in_features * jnp.exp(log_temperature))
  weights = jax.nn.softmax(logits.reshape(pixels, k), axis=-1)
  hidden = nn.leaky_relu(label @ hidden_kernel + hidden_bias)  # (E, Ch)
  # Theta_ij F_j = sum_r kappa_r a_r (b_r . F_j). Per edge only kappa and b
  # are formed (one GEMM), and b_r . F_j is a multiply-reduce.
  kappa_b = hidden @ head_kernel[:, :split] + head_bias[:split]
  right = kappa_b[:, rank:].reshape(pixels * k, rank, in_features)
  coeff = jnp.sum(right * neighbours[:, None, :], axis=-1) * kappa_b[:, :rank]
  coeff = coeff.reshape(pixels, k, rank) * weights[..., None]
  # a_r is affine in the hidden units, a_r = A_r^T hidden + a0_r, so the sum
  # over edges can be taken before applying A: sum_j coeff_jr a_jr =
  # A_r^T (sum_j coeff_jr hidden_j) + a0_r sum_j coeff_jr. This never forms
  # a per edge (r x C_out values) and ends in one pixel-level GEMM. The edge
  # sum is a batched matmul over pixels: on XLA CPU ~5x faster than a
  # broadcast product reduced over the (non-minor) neighbour axis.
  pooled = jnp.einsum("pkr,pkc->prc", coeff,
                      hidden.reshape(pixels, k, hidden_features))
  left_kernel = head_kernel[:, split:].reshape(
      hidden_features, rank, out_features)
  left_kernel = jnp.swapaxes(left_kernel, 0, 1).reshape(
      rank * hidden_features, out_features)
  left_bias = head_bias[split:].reshape(rank, out_features)
  out = (pooled.reshape(pixels, rank * hidden_features) @ left_kernel
         + jnp.sum(coeff, axis=1) @ left_bias)
  out = out / math.sqrt(rank * in_features)
  return out.reshape(batch, rows, width, out_features)


def box_average(features: Array, radius: int) -> Array:
  """Mean over the ``(2 radius + 1)^2`` window (edge-padded), per channel; 0 is the identity."""
  if radius <= 0:
    return features
  size = 2 * radius + 1
  padded = jnp.pad(features, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
  total = lax.reduce_window(padded, 0.0, lax.add, (1, size, size, 1), (1, 1, 1, 1), "VALID")
  return total / (size * size)


class GraphConv(nn.Module):
  """Non-local lightweight edge-conditioned graph convolution (GCDN ECC).

  Per pixel i and neighbour j (docs/gcn.md has the design choices):
  ``d_ij = F_j - F_i``; ``z_ij = leaky_relu(W_h d_ij + c_h)``; ``[kappa,
  a_1..a_r, b_1..b_r] = W_o z_ij + c_o``; ``Theta_ij = sum_r kappa_r a_r
  b_r^T`` (C_out x C_in, rank <= r); ``w_ij = softmax_j(-|d_ij|^2 / (C_in
  T))`` over the k neighbours, T learnt; ``out_i = sum_j w_ij Theta_ij F_j /
  sqrt(r C_in)``.

  Attributes:
    features: output channels C_out.
    k: non-local neighbours per pixel.
    search_window: odd side of the neighbour search window.
    rank: rank r of each edge's C_out x C_in weight matrix (paper: 11).
    exclude_radius: local patch radius excluded from the graph (1: 3x3).
    search_patch: neighbours are searched on features box-averaged over
      ``(2 search_patch + 1)^2`` pixels (0: the pixel's own features), i.e.
      by patch similarity as non-local means does: on noisy inputs the
      distance of single-pixel features is dominated by the noise.
      Parameter-free; the edge labels stay the pixels' own differences.
      1 gave no gain over 0 with the TDDL default GCN (docs/gcn.md).
    chunk_rows: image rows per chunk for the graph search and the edge
      network; None picks them from ``KNN_CHUNK_BYTES``/``EDGE_CHUNK_BYTES``.
      Results do not depend on it.
    param_dtype: dtype of the parameters.
    label_scale: units of the edge labels d_ij = F_j - F_i. ``'absolute'``
      (default): GCDN's raw differences. ``'local'``: divided by the pixel's
      neighbour spread sigma_i = sqrt(mean_j |d_ij|^2 / C_in) (not
      differentiated) for both the softmax and the edge network, i.e. local
      scaling (self-tuning spectral clustering, Zelnik-Manor & Perona 2004),
      which makes the layer independent of the feature scale.
      ``'local_weights'``: the softmax only. Neither beat ``'absolute'``
      with the TDDL default GCN (docs/gcn.md).
  """

  features: int
  k: int
  search_window: int
  rank: int = 11
  exclude_radius: int = 1
  chunk_rows: Optional[int] = None
  param_dtype: Any = jnp.float32
  search_patch: int = 0
  label_scale: str = "absolute"

  @nn.compact
  def __call__(self, x: Array, graph: Optional[Graph] = None) -> Array:
    """Aggregates each pixel's non-local neighbours.

    Args:
      x: ``(B, H, W, C_in)`` features.
      graph: ``(indices, distances)`` from ``knn_graph``; None builds it from
        ``x`` with this module's k, window and exclusion.

    Returns:
      ``(B, H, W, features)``.
    """
    if x.ndim != 4:
      raise ValueError(f"GraphConv takes (B, H, W, C), got {x.shape}")
    if self.label_scale not in ("absolute", "local", "local_weights"):
      raise ValueError(f"label_scale must be 'absolute', 'local' or "
                       f"'local_weights', got {self.label_scale!r}")
    batch, height, width, in_features = x.shape
    if graph is None:
      graph = knn_graph(box_average(x, self.search_patch), self.k, self.search_window,
                        self.exclude_radius, self.chunk_rows)
    indices = graph[0]
    if indices.shape != (batch, height, width, self.k):
      raise ValueError(f"graph indices {indices.shape} do not match "
                       f"{(batch, height, width, self.k)}")
    head_width = self.rank * (in_features + self.features + 1)
    params = (
        self.param("edge_hidden_kernel", nn.initializers.lecun_normal(),
                   (in_features, in_features), self.param_dtype),
        self.param("edge_hidden_bias", nn.initializers.zeros_init(),
                   (in_features,), self.param_dtype),
        self.param("edge_head_kernel", nn.initializers.lecun_normal(),
                   (in_features, head_width), self.param_dtype),
        self.param("edge_head_bias", nn.initializers.normal(1.0),
                   (head_width,), self.param_dtype),
        self.param("log_temperature", nn.initializers.zeros_init(), (),
                   self.param_dtype),
    )
    flat = x.reshape(batch, height * width, in_features)
    rows = self.chunk_rows
    if rows is None:
      # Per edge: neighbour, label, hidden (3 C_in), kappa and b
      # (r (C_in + 1)) and their product with the neighbour (r C_in).
      edge_bytes = 4 * (3 * in_features + self.rank * (2 * in_features + 1))
      rows = _balanced_rows(
          height, EDGE_CHUNK_BYTES // (batch * width * self.k * edge_bytes))
    rows = max(1, min(int(rows), height))
    if rows == height:
      return _edge_conv_rows(params, flat, x, indices, self.rank,
                             self.label_scale)
    # Rematerialised per chunk: the backward pass keeps only each chunk's
    # inputs, not its (rows * W * k * head_width) edge activations.
    body = jax.checkpoint(
        lambda band: _edge_conv_rows(params, flat, band[0], band[1],
                                     self.rank, self.label_scale))
    out = lax.map(body, (_split_rows(x, rows), _split_rows(indices, rows)))
    return _merge_rows(out, height)


class GCNBlock(nn.Module):
  """``relu(alpha * conv3x3(x) + beta * GraphConv(x))``, graph built from x.

  Attributes:
    features: output channels.
    k: non-local neighbours per pixel.
    search_window: odd side of the neighbour search window.
    rank: rank of the edge-conditioned weights.
    exclude_radius: local patch radius excluded from the graph.
    chunk_rows: see ``GraphConv``.
    conv_lowering: lowering of the local conv (see ``layers``).
    search_patch: see ``GraphConv``.
    label_scale: see ``GraphConv``.
  """

  features: int
  k: int
  search_window: int
  rank: int = 11
  exclude_radius: int = 1
  chunk_rows: Optional[int] = None
  conv_lowering: str = "auto"
  search_patch: int = 0
  label_scale: str = "absolute"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps ``(B, H, W, C_in)`` to ``(B, H, W, features)``."""
    local = Conv(self.features, (3, 3), lowering=self.conv_lowering,
                 name="local")(x)
    nonlocal_ = GraphConv(self.features, self.k, self.search_window,
                          self.rank, self.exclude_radius, self.chunk_rows,
                          search_patch=self.search_patch,
                          label_scale=self.label_scale, name="graph")(x)
    alpha = self.param("alpha", nn.initializers.constant(0.5), ())
    beta = self.param("beta", nn.initializers.constant(0.5), ())
    return nn.relu(alpha * local + beta * nonlocal_)


class GCNDenoiser(nn.Module):
  """Residual GCN denoiser: conv3x3-ReLU, ``num_blocks`` GCNBlocks, conv3x3.

  The last conv predicts the noise, which is subtracted from the input.
  Every output pixel depends on input pixels within
  ``2 + num_blocks * (search_window // 2)`` rows/columns (3x3 convs at both
  ends, one window per block), the margin within which borders matter.

  Attributes:
    features: channels of every hidden layer.
    num_blocks: GCN blocks (paper: 3).
    k: non-local neighbours per pixel (paper: 16).
    search_window: odd side of the search window (paper: 49).
    rank: rank of the edge-conditioned weights (paper: 11).
    chunk_rows: see ``GraphConv``; set it (or rely on the byte budgets) for
      whole 512x512 slices.
    conv_lowering: lowering of every conv (see ``layers``).
    search_patch: see ``GraphConv`` (0: GCDN's pixel features).
    label_scale: see ``GraphConv``.
    identity_init: the noise-predicting conv starts at zero, so the untrained
      net is the identity. With LeCun init the random noise estimate makes
      the net start worse than its input, and some seeds spent most of a
      short schedule undoing it (docs/gcn.md).
  """

  features: int = 32
  num_blocks: int = 3
  k: int = 8
  search_window: int = 15
  rank: int = 11
  chunk_rows: Optional[int] = None
  conv_lowering: str = "auto"
  search_patch: int = 0
  label_scale: str = "absolute"
  identity_init: bool = True

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """Denoises ``x``.

    Args:
      x: ``(B, H, W, C)`` images (normalised units). Every pixel needs k
        candidates; a corner pixel has ``min(R + 1, H) * min(R + 1, W) - 4``
        with R = ``search_window // 2`` (ValueError if fewer than k).
      train: unused (no batch norm or dropout); kept for the common model
        signature.

    Returns:
      ``x - predicted_noise``, same shape as ``x``.
    """
    del train
    h = nn.relu(Conv(self.features, (3, 3), lowering=self.conv_lowering,
                     name="conv_in")(x))
    for block in range(self.num_blocks):
      h = GCNBlock(self.features, self.k, self.search_window, self.rank,
                   chunk_rows=self.chunk_rows, search_patch=self.search_patch,
                   label_scale=self.label_scale,
                   conv_lowering=self.conv_lowering, name=f"block{block}")(h)
    noise = _noise_head(x.shape[-1], self.identity_init, self.conv_lowering)(h)
    return x - noise


def _noise_head(channels: int, identity_init: bool, lowering: str) -> Conv:
  """The last conv3x3, predicting the noise; zero-initialised for ``identity_init``."""
  init = nn.initializers.zeros_init() if identity_init else nn.initializers.lecun_normal()
  return Conv(channels, (3, 3), kernel_init=init, lowering=lowering, name="conv_out")


def local_path_width(features: int, rank: int = 11) -> int:
  """Hidden width M of ``LocalBlock``'s path matching a GraphConv's params.

  The path conv3x3 (C -> M) + conv1x1 (M -> C) has ``M * (10 C + 1) + C``
  parameters; M is the nearest integer to equality with
  ``graph_conv_param_count(C, C, rank)``.
  """
  target = graph_conv_param_count(features, features, rank)
  return max(1, round((target - features) / (10 * features + 1)))


class LocalBlock(nn.Module):
  """GCNBlock with the graph conv replaced by a local path of equal size.

  ``relu(alpha * conv3x3(x) + beta * conv1x1(leaky_relu(conv3x3_M(x))))``:
  the path has the graph conv's depth (hidden layer + linear head, same
  nonlinearity) and, through its width M, nearly its parameter count.

  Attributes:
    features: output channels.
    hidden_features: width M of the path.
    conv_lowering: lowering of every conv (see ``layers``).
  """

  features: int
  hidden_features: int
  conv_lowering: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps ``(B, H, W, C_in)`` to ``(B, H, W, features)``."""
    local = Conv(self.features, (3, 3), lowering=self.conv_lowering,
                 name="local")(x)
    path = nn.leaky_relu(Conv(self.hidden_features, (3, 3),
                              lowering=self.conv_lowering, name="path_in")(x))
    path = Conv(self.features, (1, 1), lowering=self.conv_lowering,
                name="path_out")(path)
    alpha = self.param("alpha", nn.initializers.constant(0.5), ())
    beta = self.param("beta", nn.initializers.constant(0.5), ())
    return nn.relu(alpha * local + beta * path)


class LocalCNN(nn.Module):
  """Ablation control: ``GCNDenoiser`` with every GraphConv made local.

  Same layers, widths, fusion and residual output as ``GCNDenoiser``; each
  GraphConv becomes the local path of ``LocalBlock``, whose width is chosen
  to match the GraphConv's parameter count (within 0.3% at the default and
  the TDDL sizes; docs/gcn.md).

  Attributes:
    features: channels of every hidden layer.
    num_blocks: blocks.
    rank: rank of the GraphConv whose parameter count the paths match.
    conv_lowering: lowering of every conv (see ``layers``).
    identity_init: see ``GCNDenoiser``.
  """

  features: int = 32
  num_blocks: int = 3
  rank: int = 11
  conv_lowering: str = "auto"
  identity_init: bool = True

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """Denoises ``(B, H, W, C)`` images; returns ``x - predicted_noise``.

    ``train`` is unused (no batch norm or dropout).
    """
    del train
    hidden = local_path_width(self.features, self.rank)
    h = nn.relu(Conv(self.features, (3, 3), lowering=self.conv_lowering,
                     name="conv_in")(x))
    for block in range(self.num_blocks):
      h = LocalBlock(self.features, hidden, self.conv_lowering,
                     name=f"block{block}")(h)
    noise = _noise_head(x.shape[-1], self.identity_init, self.conv_lowering)(h)
    return x - noise
