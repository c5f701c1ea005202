"""Convolution layers with a choice of lowering: XLA convolutions or matmuls.

Every model in ldct_jax builds its convolutions from ``Conv`` and
``ConvTranspose`` here. They are drop-in replacements for ``flax.linen.Conv``
and ``flax.linen.ConvTranspose``: same parameter names (``kernel``, ``bias``),
same shapes and layout (kernel ``(*kernel_size, in_features // groups,
features)``, bias ``(features,)``), same default initialisers and the same
output-size rules. A checkpoint written by either layer family, under any
lowering, therefore loads into the other.

Why a lowering choice: XLA's CPU convolutions are slow, above all the weight
gradient of padded and transposed convolutions (jax-ml/jax#23783, #31662). A
RED-CNN train step took ~31 s with ``nn.Conv`` on 2 CPU cores against ~2.3 s
in PyTorch. Written as slices of the input followed by matrix products, a
convolution's forward pass and both of its gradients are matrix products,
which XLA's CPU backend runs near peak. On GPU/TPU XLA's own convolutions are
the right choice, and ``'auto'`` picks them there.

Lowerings (the ``lowering`` attribute, or ``conv_lowering`` in the models):
  * ``'xla'``: ``lax.conv_general_dilated`` / ``lax.conv_transpose``.
  * ``'im2col'``: all kernel taps gathered into one ``(pixels, taps * in)``
    matrix and one matrix product. Fastest for small images, but the gathered
    buffer is ``prod(kernel_size)`` times the input and is kept for the
    backward pass.
  * ``'rows'``: one im2col per kernel row (the taps along the last spatial
    axis), accumulated over the remaining taps. Buffers are ``kernel_size[-1]``
    times the input and the matrix products stay large.
  * ``'taps'``: one matrix product per kernel tap, accumulated. No gathered
    buffer at all; the matrix products are small (contraction = in_features).
  * ``'matmul'``: one of the three above, chosen from the gathered-buffer size
    (see ``choose_matmul_lowering``).
  * ``'auto'``: ``'matmul'`` on the CPU backend, ``'xla'`` elsewhere; decided
    at trace time from ``jax.default_backend()``.

Arrays are channels-last: NHWC in 2D, NDHWC in 3D; the number of spatial
dimensions is ``len(kernel_size)``. Leading batch dimensions may be absent or
several (they are flattened, as in Flax).
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen.dtypes import promote_dtype
from jax import lax

Array = jax.Array
PaddingLike = Union[str, int, Sequence[Union[int, Tuple[int, int]]]]
Pads = Tuple[Tuple[int, int], ...]

MATMUL_LOWERINGS = ("im2col", "rows", "taps")
LOWERINGS = ("auto", "xla", "matmul") + MATMUL_LOWERINGS

# Largest gathered buffer (bytes) for which 'matmul' picks a full im2col, and
# then a per-row one. The buffer is transient (the VJP recomputes it rather
# than keeping it for the backward pass), so these limits bound peak memory.
# On a 2-core AVX-512 CPU the three matmul lowerings ran a RED-CNN layer
# (16x60x60x96, 5x5) within measurement noise of each other (0.5-0.7 CPU-s
# forward), im2col's single large GEMM being the most consistent.
IM2COL_MAX_BYTES = 1 << 30
ROWS_MAX_BYTES = 1 << 30


def _as_tuple(value: Union[int, Sequence[int], None], rank: int,
              name: str) -> Tuple[int, ...]:
  if value is None:
    return (1,) * rank
  if isinstance(value, (int, np.integer)):
    return (int(value),) * rank
  value = tuple(int(v) for v in value)
  if len(value) != rank:
    raise ValueError(f"{name} must have {rank} entries, got {value}")
  return value


def _explicit_pads(padding: PaddingLike, rank: int) -> Pads:
  """Integer or sequence padding as ``rank`` (low, high) pairs."""
  if isinstance(padding, (int, np.integer)):
    return ((int(padding), int(padding)),) * rank
  pads = []
  for entry in padding:
    if isinstance(entry, (int, np.integer)):
      pads.append((int(entry), int(entry)))
    elif len(entry) == 2:
      pads.append((int(entry[0]), int(entry[1])))
    else:
      raise ValueError(f"padding entries must be ints or (low, high) pairs, "
                       f"got {entry!r}")
  if len(pads) != rank:
    raise ValueError(f"padding needs {rank} entries, got {padding!r}")
  return tuple(pads)


def _dilated_size(kernel_size: int, dilation: int) -> int:
  return (kernel_size - 1) * dilation + 1


def conv_padding(padding: PaddingLike, in_spatial: Sequence[int],
                 kernel_size: Sequence[int], strides: Sequence[int],
                 dilation: Sequence[int]) -> Pads:
  """Resolves a forward-conv padding spec into (low, high) pairs.

  'SAME' follows ``lax.padtype_to_pads``: output size ``ceil(in / stride)``,
  the odd pixel of padding going to the high side. 'VALID' pads nothing.
  """
  rank = len(kernel_size)
  if isinstance(padding, str):
    if padding.upper() in ("SAME", "VALID"):
      dilated = [_dilated_size(k, d) for k, d in zip(kernel_size, dilation)]
      return tuple(tuple(p) for p in lax.padtype_to_pads(
          in_spatial, dilated, strides, padding.upper()))
    raise ValueError(f"padding must be 'SAME', 'VALID', an int or (low, high) "
                     f"pairs; got {padding!r}")
  return _explicit_pads(padding, rank)


def conv_transpose_padding(padding: PaddingLike, kernel_size: Sequence[int],
                           strides: Sequence[int],
                           dilation: Sequence[int]) -> Pads:
  """Padding of the input-dilated conv that computes a transposed conv.

  Same rules as ``lax.conv_transpose`` (and so ``nn.ConvTranspose``):
  'SAME' gives output ``in * stride``; 'VALID' gives
  ``in * stride + max(k_dilated - stride, 0)``; explicit pairs are used as
  they are, as padding of the stride-dilated input (not of a forward conv).
  """
  rank = len(kernel_size)
  if isinstance(padding, str):
    mode = padding.upper()
    if mode not in ("SAME", "VALID"):
      raise ValueError(f"padding must be 'SAME', 'VALID', an int or (low, high)"
                       f" pairs; got {padding!r}")
    pads = []
    for k, s, d in zip(kernel_size, strides, dilation):
      k = _dilated_size(k, d)
      if mode == "SAME":
        total = k + s - 2
        low = k - 1 if s > k - 1 else math.ceil(total / 2)
      else:
        total = k + s - 2 + max(k - s, 0)
        low = k - 1
      pads.append((low, total - low))
    return tuple(pads)
  return _explicit_pads(padding, rank)


def choose_matmul_lowering(gathered_bytes: int, row_bytes: int) -> str:
  """Picks 'im2col', 'rows' or 'taps' from the sizes of the gathered buffers.

  Args:
    gathered_bytes: size of the full im2col buffer, bytes.
    row_bytes: size of one kernel row's im2col buffer, bytes.

  Returns:
    The cheapest lowering whose gathered buffer fits its budget.
  """
  if gathered_bytes <= IM2COL_MAX_BYTES:
    return "im2col"
  if row_bytes <= ROWS_MAX_BYTES:
    return "rows"
  return "taps"


def resolve_lowering(lowering: str) -> str:
  """Maps 'auto' to 'matmul' on CPU and 'xla' on GPU/TPU; validates names."""
  if lowering not in LOWERINGS:
    raise ValueError(f"unknown conv lowering {lowering!r}; known: {LOWERINGS}")
  if lowering == "auto":
    return "matmul" if jax.default_backend() == "cpu" else "xla"
  return lowering


def _dimension_numbers(rank: int) -> lax.ConvDimensionNumbers:
  if not 1 <= rank <= 3:
    raise ValueError(f"only 1D, 2D and 3D convolutions, got rank {rank}")
  spatial = "DHW"[-rank:]
  return lax.conv_dimension_numbers(
      (1,) * (rank + 2), (1,) * (rank + 2),
      ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C"))


def _tap_groups(kernel_size: Sequence[int], method: str) -> list:
  """Kernel taps split into one group per matmul, as fixed index prefixes.

  A group is every tap whose leading indices equal the prefix, the trailing
  axes running over their whole range: im2col has one group (the empty
  prefix), 'rows' one per row of the leading axes, 'taps' one per tap.
  Groups and the taps within them are in row-major order, the order of the
  flattened kernel.
  """
  rank = len(kernel_size)
  fixed = {"im2col": 0, "rows": rank - 1}.get(method, rank)
  return list(itertools.product(*(range(k) for k in kernel_size[:fixed])))


def _group_taps(prefix: Tuple[int, ...],
                kernel_size: Sequence[int]) -> list:
  """The taps (multi-indices, row-major) of the group with ``prefix``."""
  return [prefix + rest for rest in itertools.product(
      *(range(k) for k in kernel_size[len(prefix):]))]


def _grouped(kernel: Array, groups: int) -> Array:
  """Splits a kernel's output channels into ``groups`` blocks.

  ``(taps, in // groups, out)`` -> ``(taps, in // groups, groups,
  out // groups)``: contiguous blocks, block g reading input block g, as in
  ``lax.conv_general_dilated``.
  """
  taps, in_per_group, out_features = kernel.shape
  return kernel.reshape(taps, in_per_group, groups, out_features // groups)


def _patches_times_kernel(patches: Array, kernel: Array, groups: int,
                          precision: Any) -> Array:
  """``(..., taps, in)`` x ``(taps, in // groups, out)`` -> ``(..., out)``."""
  taps, in_per_group, out_features = kernel.shape
  lead = patches.shape[:-2]
  if groups == 1:
    # Flattening (taps, in) keeps the contraction in one large GEMM.
    return jnp.dot(patches.reshape(lead + (taps * in_per_group,)),
                   kernel.reshape(taps * in_per_group, out_features),
                   precision=precision)
  out = jnp.einsum("...tgc,tcgo->...go",
                   patches.reshape(lead + (taps, groups, in_per_group)),
                   _grouped(kernel, groups), precision=precision)
  return out.reshape(lead + (out_features,))


def _patches_times_output(patches: Array, dy: Array, groups: int,
                          precision: Any) -> Array:
  """Kernel gradient: patches ``(..., taps, in)`` x output gradient.

  Contracts all pixels of the patches with those of the output gradient
  ``(..., out)``; returns ``(taps, in // groups, out)``.
  """
  taps, in_features = patches.shape[-2:]
  out_features = dy.shape[-1]
  pixels = dy.size // out_features
  if groups == 1:
    grad = jnp.dot(patches.reshape(pixels, taps * in_features).T,
                   dy.reshape(pixels, out_features), precision=precision)
    return grad.reshape(taps, in_features, out_features)
  grad = jnp.einsum(
      "mtgc,mgo->tcgo",
      patches.reshape(pixels, taps, groups, in_features // groups),
      dy.reshape(pixels, groups, out_features // groups), precision=precision)
  return grad.reshape(taps, in_features // groups, out_features)


def _transposed_kernel(kernel: Array, groups: int) -> Array:
  """Kernel of the conv that maps output gradients back to input gradients.

  Spatially flipped, input/output channels swapped within each group:
  ``(*k, in // groups, out)`` -> ``(*k, out // groups, in)``.
  """
  rank = kernel.ndim - 2
  in_per_group, out_features = kernel.shape[rank:]
  flipped = jnp.flip(kernel, axis=tuple(range(rank)))
  flipped = flipped.reshape(kernel.shape[:rank] + (
      in_per_group, groups, out_features // groups))
  flipped = jnp.swapaxes(flipped, rank, rank + 2)
  return flipped.reshape(kernel.shape[:rank] + (
      out_features // groups, groups * in_per_group))


def _gather_out_spatial(padded_spatial: Sequence[int],
                        kernel_size: Sequence[int], strides: Sequence[int],
                        dilation: Sequence[int]) -> Tuple[int, ...]:
  return tuple((n - _dilated_size(k, d)) // s + 1 for n, k, d, s in zip(
      padded_spatial, kernel_size, dilation, strides))


def _pad_spatial(x: Array, pads: Pads, interior: Sequence[int]) -> Array:
  """Zero-pads spatial axes (negative pads crop), with interior dilation."""
  return lax.pad(x, jnp.zeros((), x.dtype),
                 ((0, 0, 0),)
                 + tuple((lo, hi, i) for (lo, hi), i in zip(pads, interior))
                 + ((0, 0, 0),))


def _tap_patches(x_padded: Array, prefix: Tuple[int, ...],
                 kernel_size: Sequence[int], out_spatial: Sequence[int],
                 strides: Sequence[int], dilation: Sequence[int]) -> Array:
  """Stacks, per tap of a group, the input pixels it meets.

  Output pixel o meets padded-input pixel ``o * stride + tap * dilation``
  (cross-correlation, as ``lax.conv_general_dilated``). Returns ``(n, *out,
  taps, in)`` for the taps of ``_group_taps(prefix, kernel_size)``.

  The gather runs one spatial axis at a time, last axis first: slice the last
  axis once per tap and stack, then slice the next axis of that
  (``kernel_size[-1]`` times larger) array, and so on. Each stage copies
  contiguous runs of ``taps-so-far * in`` values; on XLA CPU this is ~1.5x
  faster than stacking all ``prod(kernel_size)`` slices of the input at once
  (0.59 s against 0.87 s for a 16x64x64x96 input and a 5x5 kernel), and the
  gather, as much as the matmul, sets these lowerings' speed.
  """
  rank = len(kernel_size)

  def axis_slice(x, axis, tap):
    start = tap * dilation[axis]
    return lax.slice_in_dim(x, start, start + (out_spatial[axis] - 1)
                            * strides[axis] + 1, strides[axis], axis=1 + axis)

  x = x_padded
  for axis, tap in enumerate(prefix):
    x = axis_slice(x, axis, tap)
  stacked = 0
  for axis in reversed(range(len(prefix), rank)):
    # New tap axis goes in front of the tap axes stacked so far: row-major.
    x = jnp.stack([axis_slice(x, axis, tap)
                   for tap in range(kernel_size[axis])],
                  axis=x.ndim - 1 - stacked)
    stacked += 1
  return x.reshape(x.shape[:rank + 1] + (-1, x.shape[-1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _conv_gather(x: Array, kernel: Array, strides: Tuple[int, ...],
                 pads: Pads, dilation: Tuple[int, ...], groups: int,
                 method: str, precision: Any) -> Array:
  """Forward convolution as strided slices of the padded input + matmuls.

  Has a hand-written VJP: autodiff would turn the gathered slices into a
  scatter-add of a ``taps``-times larger gradient buffer (col2im), ~2x slower
  on XLA CPU than computing the input gradient as another gather convolution
  of the output gradient with the flipped kernel, as cuDNN does. The VJP also
  recomputes the patches instead of keeping them, so training memory does not
  grow with ``prod(kernel_size)``.
  """
  rank = kernel.ndim - 2
  kernel_size = kernel.shape[:rank]
  x_padded = _pad_spatial(x, pads, (0,) * rank)
  out_spatial = _gather_out_spatial(x_padded.shape[1:-1], kernel_size,
                                    strides, dilation)
  if any(n <= 0 for n in out_spatial):
    raise ValueError(f"convolution output would be empty: padded input "
                     f"{x_padded.shape[1:-1]}, kernel {kernel_size}, "
                     f"dilation {dilation}")
  flat_kernel = kernel.reshape((-1,) + kernel.shape[rank:])
  out, first = None, 0
  for prefix in _tap_groups(kernel_size, method):
    patches = _tap_patches(x_padded, prefix, kernel_size, out_spatial, strides,
                           dilation)
    count = patches.shape[-2]
    term = _patches_times_kernel(patches, flat_kernel[first:first + count],
                                 groups, precision)
    out = term if out is None else out + term
    first += count
  return out


def _conv_gather_fwd(x, kernel, strides, pads, dilation, groups, method,
                     precision):
  y = _conv_gather(x, kernel, strides, pads, dilation, groups, method,
                   precision)
  return y, (x, kernel)


def _conv_gather_bwd(strides, pads, dilation, groups, method, precision,
                     residuals, dy):
  x, kernel = residuals
  rank = kernel.ndim - 2
  kernel_size = kernel.shape[:rank]
  x_padded = _pad_spatial(x, pads, (0,) * rank)
  out_spatial = dy.shape[1:-1]
  grads = [
      _patches_times_output(
          _tap_patches(x_padded, prefix, kernel_size, out_spatial, strides,
                       dilation), dy, groups, precision)
      for prefix in _tap_groups(kernel_size, method)]
  grad_kernel = jnp.concatenate(grads, axis=0).reshape(kernel.shape)
  # Input gradient: correlate the stride-dilated output gradient with the
  # flipped kernel; pads chosen so the result covers exactly the unpadded x
  # (padded x spans [-lo, n + hi), and each output pixel o reaches padded
  # pixels o * stride + [0, (k - 1) * dilation]).
  grad_pads = tuple(
      ((k - 1) * d - lo, n + lo - (m - 1) * s - 1)
      for (lo, _), k, d, s, n, m in zip(pads, kernel_size, dilation, strides,
                                        x.shape[1:-1], out_spatial))
  grad_x = conv_transpose_general(dy, _transposed_kernel(kernel, groups),
                                  strides, grad_pads, dilation, groups, method,
                                  precision)
  return grad_x.astype(x.dtype), grad_kernel.astype(kernel.dtype)


_conv_gather.defvjp(_conv_gather_fwd, _conv_gather_bwd)


def _tap_products(x: Array, kernel: Array, groups: int,
                  precision: Any) -> Array:
  """Every input pixel times every tap.

  ``(..., in)`` x ``(taps, in // groups, out)`` -> ``(..., taps, out)``.
  """
  taps, in_per_group, out_features = kernel.shape
  lead = x.shape[:-1]
  if groups == 1:
    # One GEMM for all taps: (pixels, in) @ (in, taps * out).
    products = jnp.dot(
        x, jnp.moveaxis(kernel, 0, 1).reshape(in_per_group, -1),
        precision=precision)
    return products.reshape(lead + (taps, out_features))
  products = jnp.einsum("...gc,tcgo->...tgo",
                        x.reshape(lead + (groups, in_per_group)),
                        _grouped(kernel, groups), precision=precision)
  return products.reshape(lead + (taps, out_features))


def _conv_transpose_scatter(x: Array, kernel: Array, strides: Sequence[int],
                            pads: Pads, dilation: Sequence[int], groups: int,
                            method: str, precision: Any) -> Array:
  """Transposed (input-dilated) convolution as matmuls + strided scatter-adds.

  Computes ``conv(pad(dilate(x, strides), pads), kernel)`` (no kernel flip,
  as ``lax.conv_transpose`` with ``transpose_kernel=False``) without forming
  the dilated input, whose zeros would waste ``prod(strides)`` of the work:
  input pixel i times kernel tap t lands at output pixel
  ``pads_low + i * stride - t * dilation``. Each tap's product is placed by a
  ``lax.pad`` with interior padding ``stride - 1``. Autodiff of this form is
  already fast: the placements turn into strided slices (a gather) and the
  products into matmuls.
  """
  rank = kernel.ndim - 2
  kernel_size = kernel.shape[:rank]
  spread = tuple((n - 1) * s + 1 for n, s in zip(x.shape[1:-1], strides))
  out_spatial = tuple(
      lo + n + hi - _dilated_size(k, d) + 1
      for (lo, hi), n, k, d in zip(pads, spread, kernel_size, dilation))
  if any(n <= 0 for n in out_spatial):
    raise ValueError(f"transposed convolution output would be empty: input "
                     f"{x.shape[1:-1]}, kernel {kernel_size}, padding {pads}")
  flat_kernel = kernel.reshape((-1,) + kernel.shape[rank:])

  def place(product: Array, tap: Sequence[int]) -> Array:
    tap_pads, crop = [], [0]
    for (lo, hi), t, d, k in zip(pads, tap, dilation, kernel_size):
      low, high = lo - t * d, hi - (k - 1 - t) * d
      # Pad by the positive parts, then crop the negative ones: a tap may fall
      # further outside the output than the product is long.
      tap_pads.append((max(low, 0), max(high, 0)))
      crop.append(max(-low, 0))
    placed = _pad_spatial(product, tuple(tap_pads), [s - 1 for s in strides])
    crop.append(0)
    size = (x.shape[0],) + out_spatial + (product.shape[-1],)
    return lax.slice(placed, crop, [c + n for c, n in zip(crop, size)])

  out, first = None, 0
  # Gathering is not involved here, so 'rows' has no meaning of its own and
  # maps to one product per tap.
  for prefix in _tap_groups(kernel_size, "im2col" if method == "im2col"
                            else "taps"):
    taps = _group_taps(prefix, kernel_size)
    products = _tap_products(x, flat_kernel[first:first + len(taps)], groups,
                             precision)
    for index, tap in enumerate(taps):
      term = place(products[..., index, :], tap)
      out = term if out is None else out + term
    first += len(taps)
  return out


def _pick_matmul_lowering(pixels: int, kernel: Array, itemsize: int,
                          channels: int) -> str:
  """'matmul' -> im2col/rows/taps from the gathered buffer of one conv."""
  kernel_size = kernel.shape[:kernel.ndim - 2]
  per_tap = pixels * channels * itemsize
  return choose_matmul_lowering(per_tap * math.prod(kernel_size),
                                per_tap * kernel_size[-1])


def conv_general(x: Array, kernel: Array, strides: Sequence[int], pads: Pads,
                 dilation: Sequence[int], feature_group_count: int = 1,
                 lowering: str = "auto", precision: Any = None) -> Array:
  """Cross-correlation of a channels-last batch, any lowering.

  Equals ``lax.conv_general_dilated(x, kernel, strides, pads,
  rhs_dilation=dilation, feature_group_count=...)`` with NHWC/HWIO (or
  NDHWC/DHWIO) dimension numbers.

  Args:
    x: ``(batch, *spatial, in_features)``.
    kernel: ``(*kernel_size, in_features // groups, out_features)``.
    strides: per spatial axis.
    pads: (low, high) per spatial axis; negative values crop.
    dilation: kernel dilation per spatial axis.
    feature_group_count: input/output channel groups.
    lowering: one of ``LOWERINGS``.
    precision: ``lax.Precision`` of the products; None is the backend default
      (full float32 on CPU, possibly TF32 on recent NVIDIA GPUs).

  Returns:
    ``(batch, *out_spatial, out_features)``.
  """
  rank = kernel.ndim - 2
  strides, dilation = tuple(strides), tuple(dilation)
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  method = resolve_lowering(lowering)
  if method == "xla":
    return lax.conv_general_dilated(
        x, kernel, strides, pads, rhs_dilation=dilation,
        dimension_numbers=_dimension_numbers(rank),
        feature_group_count=feature_group_count, precision=precision)
  if method == "matmul":
    padded = [n + lo + hi for n, (lo, hi) in zip(x.shape[1:-1], pads)]
    out_spatial = _gather_out_spatial(padded, kernel.shape[:rank], strides,
                                      dilation)
    method = _pick_matmul_lowering(
        x.shape[0] * math.prod(max(n, 1) for n in out_spatial), kernel,
        x.dtype.itemsize, x.shape[-1])
  return _conv_gather(x, kernel, strides, pads, dilation, feature_group_count,
                      method, precision)


def conv_transpose_general(x: Array, kernel: Array, strides: Sequence[int],
                           pads: Pads, dilation: Sequence[int],
                           feature_group_count: int = 1,
                           lowering: str = "auto",
                           precision: Any = None) -> Array:
  """Transposed convolution with ``lax.conv_transpose`` semantics, any lowering.

  Equals ``lax.conv_general_dilated(x, kernel, 1, pads, lhs_dilation=strides,
  rhs_dilation=dilation)``: the kernel is NOT flipped (``transpose_kernel=
  False`` in JAX/Flax; PyTorch and Keras flip it and swap its channel axes).
  With stride 1 this is a plain convolution with padding ``pads``.

  Args:
    x: ``(batch, *spatial, in_features)``.
    kernel: ``(*kernel_size, in_features // groups, out_features)``.
    strides: upsampling factor per spatial axis.
    pads: (low, high) padding of the stride-dilated input, from
      ``conv_transpose_padding``; negative values crop.
    dilation: kernel dilation per spatial axis.
    feature_group_count: input/output channel groups.
    lowering: one of ``LOWERINGS``.
    precision: ``lax.Precision`` of the products.

  Returns:
    ``(batch, *out_spatial, out_features)``.
  """
  rank = kernel.ndim - 2
  strides, dilation = tuple(strides), tuple(dilation)
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  method = resolve_lowering(lowering)
  if method == "xla":
    return lax.conv_general_dilated(
        x, kernel, (1,) * rank, pads, lhs_dilation=strides,
        rhs_dilation=dilation, dimension_numbers=_dimension_numbers(rank),
        feature_group_count=feature_group_count, precision=precision)
  if all(s == 1 for s in strides):
    return conv_general(x, kernel, strides, pads, dilation,
                        feature_group_count, method, precision)
  if method == "matmul":
    # The scatter form's buffer holds one product per tap and input pixel.
    method = _pick_matmul_lowering(x.size // x.shape[-1], kernel,
                                   x.dtype.itemsize, kernel.shape[-1])
  return _conv_transpose_scatter(x, kernel, strides, pads, dilation,
                                 feature_group_count, method, precision)


def _flatten_batch(inputs: Array, rank: int) -> Tuple[Array, Tuple[int, ...]]:
  """Collapses all leading batch axes into one, as Flax's conv layers do."""
  if inputs.ndim < rank + 1:
    raise ValueError(f"a {rank}D convolution needs at least {rank + 1} input "
                     f"dims (spatial + channels), got shape {inputs.shape}")
  batch_shape = inputs.shape[:inputs.ndim - rank - 1]
  return inputs.reshape((-1,) + inputs.shape[len(batch_shape):]), batch_shape


class Conv(nn.Module):
  """Drop-in ``flax.linen.Conv`` with a selectable lowering.

  Attributes:
    features: output channels.
    kernel_size: spatial kernel size; its length (2 or 3) sets 2D or 3D.
    strides: int or per-axis strides.
    padding: 'SAME', 'VALID', an int, or per-axis ints / (low, high) pairs.
    kernel_dilation: int or per-axis kernel (atrous) dilation.
    feature_group_count: channel groups (in and out features divisible by it).
    use_bias: add a learnt per-channel bias.
    dtype: computation dtype (None: promoted from input and params). bf16
      halves memory, but XLA CPU runs bf16 matmuls ~2.5x slower than float32
      on CPUs without AMX; useful on GPU/TPU.
    param_dtype: dtype of the stored parameters.
    precision: ``lax.Precision`` of the products (None: backend default).
    kernel_init: kernel initialiser (Flax default: LeCun normal).
    bias_init: bias initialiser (zeros).
    lowering: one of ``LOWERINGS``; see the module docstring.
  """

  features: int
  kernel_size: Sequence[int]
  strides: Union[int, Sequence[int]] = 1
  padding: PaddingLike = "SAME"
  kernel_dilation: Union[int, Sequence[int]] = 1
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  lowering: str = "auto"

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """Convolves ``inputs`` of shape ``(*batch, *spatial, in_features)``."""
    kernel_size = tuple(self.kernel_size)
    rank = len(kernel_size)
    strides = _as_tuple(self.strides, rank, "strides")
    dilation = _as_tuple(self.kernel_dilation, rank, "kernel_dilation")
    x, batch_shape = _flatten_batch(inputs, rank)
    in_features = x.shape[-1]
    groups = self.feature_group_count
    if in_features % groups or self.features % groups:
      raise ValueError(f"in ({in_features}) and out ({self.features}) features"
                       f" must be divisible by feature_group_count={groups}")
    kernel = self.param("kernel", self.kernel_init,
                        kernel_size + (in_features // groups, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    pads = conv_padding(self.padding, x.shape[1:-1], kernel_size, strides,
                        dilation)
    y = conv_general(x, kernel, strides, pads, dilation, groups,
                     self.lowering, self.precision)
    if bias is not None:
      y = y + bias
    return y.reshape(batch_shape + y.shape[1:])


class ConvTranspose(nn.Module):
  """Drop-in ``flax.linen.ConvTranspose`` with a selectable lowering.

  Output sizes follow ``lax.conv_transpose``: 'SAME' gives ``in * stride``,
  'VALID' gives ``in * stride + max(k_dilated - stride, 0)`` (stride 1:
  ``in + k - 1``, the RED-CNN decoder), explicit pairs pad the stride-dilated
  input directly. As in Flax by default, the kernel is applied unflipped.

  Attributes:
    features: output channels.
    kernel_size: spatial kernel size; its length sets 2D or 3D.
    strides: int or per-axis upsampling factors.
    padding: 'SAME', 'VALID', an int, or per-axis ints / (low, high) pairs.
    kernel_dilation: int or per-axis kernel dilation.
    use_bias: add a learnt per-channel bias.
    dtype: computation dtype (None: promoted from input and params).
    param_dtype: dtype of the stored parameters.
    precision: ``lax.Precision`` of the products (None: backend default).
    kernel_init: kernel initialiser (Flax default: LeCun normal).
    bias_init: bias initialiser (zeros).
    lowering: one of ``LOWERINGS``; see the module docstring.
  """

  features: int
  kernel_size: Sequence[int]
  strides: Union[int, Sequence[int]] = 1
  padding: PaddingLike = "SAME"
  kernel_dilation: Union[int, Sequence[int]] = 1
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  lowering: str = "auto"

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """Applies the transposed conv to ``(*batch, *spatial, in_features)``."""
    kernel_size = tuple(self.kernel_size)
    rank = len(kernel_size)
    strides = _as_tuple(self.strides, rank, "strides")
    dilation = _as_tuple(self.kernel_dilation, rank, "kernel_dilation")
    x, batch_shape = _flatten_batch(inputs, rank)
    kernel = self.param("kernel", self.kernel_init,
                        kernel_size + (x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    pads = conv_transpose_padding(self.padding, kernel_size, strides, dilation)
    y = conv_transpose_general(x, kernel, strides, pads, dilation, 1,
                               self.lowering, self.precision)
    if bias is not None:
      y = y + bias
    return y.reshape(batch_shape + y.shape[1:])
