"""U-Net (Ronneberger et al., MICCAI 2015) as a residual image denoiser.

Level ``l`` (0-based, ``l < depth``): two 3x3 'SAME' conv + ReLU with
``features * 2**l`` channels, kept as the skip, then 2x2 max pooling. The
bottleneck has ``features * 2**depth`` channels. Each decoder level upsamples
with a 2x2 stride-2 transposed conv, concatenates the skip (channels last),
and applies two 3x3 conv + ReLU. A 1x1 conv maps to the input's channels and
its output is added to the input (residual learning, as in FBPConvNet, Jin et
al., IEEE TIP 2017). 'SAME' padding and exact 2x pooling need height and width
divisible by ``2**depth``.
"""
from __future__ import annotations

import jax
from flax import linen as nn

from ldct_jax.models.layers import Conv, ConvTranspose


class UNet(nn.Module):
  """Residual U-Net.

  Attributes:
    features: channels at the finest level; doubled at every coarser level.
    depth: pooling steps (the image is reduced by ``2**depth``).
    conv_lowering: conv lowering passed to every layer (see ``layers``).
  """

  features: int = 32
  depth: int = 4
  conv_lowering: str = "auto"

  def _double_conv(self, h: jax.Array, features: int, name: str) -> jax.Array:
    for index in range(2):
      h = nn.relu(Conv(features, (3, 3), lowering=self.conv_lowering,
                       name=f"{name}_conv{index}")(h))
    return h

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Denoises ``x``.

    Args:
      x: ``(batch, height, width, channels)`` images, HU-normalised units;
        height and width divisible by ``2**depth``.
      train: unused (no batch norm or dropout); kept for the common
        model signature.

    Returns:
      ``x + predicted residual``, same shape as ``x``.
    """
    del train
    factor = 2 ** self.depth
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"UNet with depth {self.depth} needs height and width "
                       f"divisible by {factor}, got {x.shape[1:3]}; pad or "
                       f"crop the input")
    skips = []
    h = x
    for level in range(self.depth):
      h = self._double_conv(h, self.features * 2 ** level, f"down{level}")
      skips.append(h)
      h = nn.max_pool(h, (2, 2), strides=(2, 2))
    h = self._double_conv(h, self.features * 2 ** self.depth, "bottleneck")
    for level in reversed(range(self.depth)):
      features = self.features * 2 ** level
      h = ConvTranspose(features, (2, 2), strides=2, padding="VALID",
                        lowering=self.conv_lowering, name=f"up{level}")(h)
      h = jax.numpy.concatenate([skips[level], h], axis=-1)
      h = self._double_conv(h, features, f"up{level}")
    residual = Conv(x.shape[-1], (1, 1), lowering=self.conv_lowering,
                    name="conv_out")(h)
    return x + residual
