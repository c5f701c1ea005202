"""The WGAN critic: a convolutional network scoring how NDCT-like a slice looks.

The discriminator of WGAN-VGG (Yang et al., IEEE TMI 2018), also the one of
CPCE's WGAN setup (Shan et al., IEEE TMI 2018): six 3x3 convolutions with
64, 64, 128, 128, 256, 256 filters and strides 1, 2, 1, 2, 1, 2, each
followed by a leaky ReLU (slope 0.2), then a dense layer of 1024 units
(leaky ReLU) and a dense layer of one unit: an unbounded score, no sigmoid
(a Wasserstein critic, not a classifier).

There is no batch norm, deliberately: the gradient penalty of WGAN-GP
(``ldct_jax.methods.wgan``) constrains the norm of the critic's gradient with
respect to each input sample separately, which is only meaningful when each
sample's score depends on that sample alone (Gulrajani et al. 2017, section 4;
batch norm mixes the samples of a batch). Layer norm or none are the options;
the papers use none.

Convolutions use 'SAME' padding, so the critic accepts any patch size (the
tiny test patches too); the flattened size before the first dense layer, and
hence that layer's shape, follows from the patch size (48 px: 6 x 6 x 256).
For a 3D (slab) generator the critic judges its output, the denoised central
slice, against the central NDCT slice: it is 2D in every case.
"""
from __future__ import annotations

from typing import Sequence

import jax
from flax import linen as nn

from ldct_jax.models.layers import Conv


class Critic(nn.Module):
  """WGAN critic on ``(B, H, W, C)`` images -> ``(B,)`` scores.

  Attributes:
    features: filters of each conv layer (paper: 64, 64, 128, 128, 256, 256).
    strides: stride of each conv layer (paper: 1, 2, 1, 2, 1, 2).
    dense: units of the hidden dense layer (paper: 1024).
    negative_slope: leaky ReLU slope (paper: 0.2).
    conv_lowering: conv lowering (see ``layers``).
  """

  features: Sequence[int] = (64, 64, 128, 128, 256, 256)
  strides: Sequence[int] = (1, 2, 1, 2, 1, 2)
  dense: int = 1024
  negative_slope: float = 0.2
  conv_lowering: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Scores ``x``.

    Args:
      x: ``(batch, height, width, channels)`` images in model units.
      train: unused (no batch norm or dropout); the common model signature.

    Returns:
      ``(batch,)`` float scores; higher means more like the real (NDCT) data.
    """
    del train
    if x.ndim != 4:
      raise ValueError(f"the critic takes (B, H, W, C) images, got shape {x.shape}")
    if len(self.features) != len(self.strides):
      raise ValueError(f"critic features {tuple(self.features)} and strides "
                       f"{tuple(self.strides)} differ in length")
    h = x
    for index, (features, stride) in enumerate(zip(self.features, self.strides)):
      h = Conv(features, (3, 3), strides=stride, padding="SAME", lowering=self.conv_lowering,
               name=f"conv{index + 1}")(h)
      h = nn.leaky_relu(h, self.negative_slope)
    h = h.reshape((h.shape[0], -1))
    h = nn.leaky_relu(nn.Dense(self.dense, name="dense1")(h), self.negative_slope)
    return nn.Dense(1, name="dense2")(h)[:, 0]
