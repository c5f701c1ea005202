"""CPCE-2D and CPCE-3D: conveying-path convolutional encoder-decoders.

Shan et al., "3-D convolutional encoder-decoder network for low-dose CT via
transfer learning from a 2-D trained network", IEEE TMI 37(6), 2018 (and the
2017 CPCA slides). The generator of their WGAN/perceptual-loss setup; here it
is a plain denoiser that any method can train.

Layers (``num_layers = 4`` in the paper; every conv 3x3, stride 1, VALID, so
each one shrinks height and width by 2 and each transposed conv grows them
back by 2; ReLU after every conv, the last included)::

  encoder  conv1 .. conv4                 C -> F -> F -> F -> F
  decoder  deconv1, concat conv3, reduce1  F -> F, [F | F] = 2F -> F (1x1)
           deconv2, concat conv2, reduce2  F -> F, 2F -> F
           deconv3, concat conv1, reduce3  F -> F, 2F -> F
           deconv4                         F -> C

Channel bookkeeping: deconv ``j`` restores the size of encoder conv
``num_layers - j``; its output is concatenated (decoder features first,
then the encoder's, channels last) with that conv's output (the conveying
path), and a 1x1 conv ``reduce j`` brings the 2F channels back to F. The
last deconv has no conveying path and maps to the input's channels C.
F = 32 in the paper. As in the official code, convolutions have no bias.

CPCE-3D reads a slab of k adjacent slices, ``(B, k, H, W, C)`` (NDHWC), and
denoises the central one. Its first encoder convs are 3x3x3 with VALID depth
padding, each shrinking the depth by 2 (k = 9: 9 -> 7 -> 5 -> 3 -> 1, so all
four encoder convs are 3D; k = 3: only conv1 is). Once the depth is 1 the
slab is squeezed to ``(B, H, W, F)`` and the rest is the 2D network. The
conveying paths take the central slice of a 3D conv's output, so the decoder
is the 2D decoder exactly. Output ``(B, H, W, C)``.

Transfer learning (``inflate_2d_to_3d``): a 3x3 kernel H becomes the
3x3x3 kernel B with B(0) = 0, B(1) = H, B(2) = 0. With VALID depth padding
output slice j of an inflated conv is H applied to input slice j + 1, so
every slice of every 3D feature map is the 2D feature map of one input slice
and the central output is exactly CPCE-2D on the central slice.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from ldct_jax.models.layers import Conv, ConvTranspose

_KERNEL = (3, 3)
# Each 3x3 VALID conv removes one pixel on every side.
_SHRINK_PER_LAYER = _KERNEL[0] - 1


class CPCE2D(nn.Module):
  """CPCE-2D denoiser on ``(B, H, W, C)`` images.

  Attributes:
    features: channels of every hidden layer (paper: 32).
    num_layers: encoder convs, and as many decoder transposed convs
      (paper: 4); ``num_layers - 1`` conveying paths.
    use_bias: learnt biases (the official code has none).
    conv_lowering: conv lowering passed to every layer (see ``layers``).
  """

  features: int = 32
  num_layers: int = 4
  use_bias: bool = False
  conv_lowering: str = "auto"

  def _conv(self, features: int, kernel_size, name: str) -> nn.Module:
    return Conv(features, kernel_size, padding="VALID", use_bias=self.use_bias,
                lowering=self.conv_lowering, name=name)

  def _check_size(self, x: jax.Array) -> None:
    shrink = self.num_layers * _SHRINK_PER_LAYER
    if min(x.shape[-3:-1]) <= shrink:
      raise ValueError(f"CPCE with {self.num_layers} layers of 3x3 VALID convs"
                       f" needs images larger than {shrink} px, got "
                       f"{x.shape[-3:-1]}")

  def _encode_2d(self, h: jax.Array, first: int, skips: dict) -> jax.Array:
    """2D encoder convs ``first .. num_layers``; records their outputs."""
    for depth in range(first, self.num_layers + 1):
      h = nn.relu(self._conv(self.features, _KERNEL, f"conv{depth}")(h))
      skips[depth] = h
    return h

  def _decode(self, h: jax.Array, skips: dict, out_features: int) -> jax.Array:
    """Transposed convs with conveying paths; ``skips[d]`` is conv d's output."""
    for layer in range(1, self.num_layers + 1):
      last = layer == self.num_layers
      h = nn.relu(ConvTranspose(
          out_features if last else self.features, _KERNEL, padding="VALID",
          use_bias=self.use_bias, lowering=self.conv_lowering,
          name=f"deconv{layer}")(h))
      if not last:
        # deconv `layer` restores the size of encoder conv num_layers - layer.
        h = jnp.concatenate([h, skips[self.num_layers - layer]], axis=-1)
        h = nn.relu(self._conv(self.features, (1, 1), f"reduce{layer}")(h))
    return h

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Denoises ``x``.

    Args:
      x: ``(batch, height, width, channels)``, HU-normalised so that the
        valid range is >= 0 (the last ReLU makes outputs non-negative).
        Height and width must exceed ``2 * num_layers``.
      train: unused (no batch norm or dropout); kept for the common model
        signature.

    Returns:
      Denoised images, same shape as ``x``.
    """
    del train
    self._check_size(x)
    skips = {}
    h = self._encode_2d(x, 1, skips)
    return self._decode(h, skips, x.shape[-1])


class CPCE3D(CPCE2D):
  """CPCE-3D: a slab ``(B, k, H, W, C)`` in, its central slice denoised out.

  The first ``(k - 1) // (kernel_depth - 1)`` encoder convs are 3D with
  VALID depth padding; the rest of the network is CPCE-2D with the same
  layer names, so ``inflate_2d_to_3d`` maps CPCE-2D parameters onto it.

  Attributes:
    kernel_depth: depth of the 3D kernels (paper: 3); odd.
  """

  kernel_depth: int = 3

  def num_3d_layers(self, slices: int) -> int:
    """3D encoder convs needed to reduce ``slices`` to one slice."""
    if self.kernel_depth < 3 or self.kernel_depth % 2 == 0:
      raise ValueError(f"kernel_depth must be odd and >= 3, got "
                       f"{self.kernel_depth}")
    shrink = self.kernel_depth - 1
    if slices < 1 or (slices - 1) % shrink:
      raise ValueError(f"slab depth must be 1 + a multiple of {shrink}, got "
                       f"{slices}")
    count = (slices - 1) // shrink
    if count > self.num_layers:
      raise ValueError(f"slab of {slices} slices needs {count} 3D convs, more "
                       f"than the {self.num_layers} encoder layers")
    return count

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Denoises the central slice of ``x``.

    Args:
      x: ``(batch, k, height, width, channels)`` slab of k adjacent slices,
        k = 1 + 2 * (number of 3D convs) for 3x3x3 kernels (3, 5, 7, 9).
      train: unused; kept for the common model signature.

    Returns:
      ``(batch, height, width, channels)``, the central slice denoised.
    """
    del train
    if x.ndim != 5:
      raise ValueError(f"CPCE3D takes (B, k, H, W, C) slabs, got {x.shape}")
    self._check_size(x)
    num_3d = self.num_3d_layers(x.shape[1])
    skips = {}
    h = x
    for depth in range(1, num_3d + 1):
      h = nn.relu(self._conv(self.features, (self.kernel_depth,) + _KERNEL,
                             f"conv{depth}")(h))
      # The conveying path carries only the central slice: the decoder is 2D.
      skips[depth] = h[:, h.shape[1] // 2]
    h = h[:, 0]  # depth is now 1
    h = self._encode_2d(h, num_3d + 1, skips)
    return self._decode(h, skips, x.shape[-1])


def inflate_2d_to_3d(params_2d: Mapping[str, Any], depth: int = 3,
                     slices: int = 9) -> dict:
  """CPCE-2D parameters -> CPCE-3D parameters computing the same function.

  Each 3D encoder conv's kernel H ``(3, 3, in, out)`` becomes B
  ``(depth, 3, 3, in, out)`` with H at the central depth and zeros elsewhere
  (B(0) = 0, B(1) = H, B(2) = 0 for depth 3). All other layers are copied.

  Args:
    params_2d: the ``params`` collection of a ``CPCE2D`` (plain dict or
      FrozenDict), layers keyed ``conv1``, ``deconv1``, ``reduce1``, ...
    depth: kernel depth of the target ``CPCE3D`` (its ``kernel_depth``).
    slices: slab depth k the 3D model reads; decides how many encoder convs
      are 3D (``(slices - 1) // (depth - 1)``).

  Returns:
    A plain dict to use as ``{'params': ...}`` of ``CPCE3D(kernel_depth=
    depth)`` on ``(B, slices, H, W, C)`` inputs.
  """
  num_3d = CPCE3D(kernel_depth=depth,
                  num_layers=sum(name.startswith("conv") for name in params_2d)
                  ).num_3d_layers(slices)
  inflated = {}
  for name, layer in params_2d.items():
    layer = dict(layer)
    if name in {f"conv{i}" for i in range(1, num_3d + 1)}:
      kernel = layer["kernel"]
      layer["kernel"] = jnp.zeros((depth,) + kernel.shape,
                                  kernel.dtype).at[depth // 2].set(kernel)
    inflated[name] = layer
  return inflated
