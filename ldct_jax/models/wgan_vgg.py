"""The WGAN-VGG generator (Yang et al., IEEE TMI 2018): eight plain 3x3 convolutions.

Yang et al. kept the generator deliberately simple so that the adversarial
and perceptual losses, not the architecture, explain the result: eight
convolutional layers, 3x3 kernels, the first seven with 32 filters and the
last with one, a ReLU after every layer (the last included, so outputs are
non-negative: in the default normalisation 0 is -1024 HU, nothing real lies
below it). No pooling, no shortcut, no batch norm; 'SAME' padding keeps the
image size, so whole slices denoise in one pass.
"""
from __future__ import annotations

import jax
from flax import linen as nn

from ldct_jax.models.layers import Conv


class WGANVGGGenerator(nn.Module):
  """Eight-layer CNN denoiser on ``(B, H, W, C)`` images.

  Attributes:
    features: filters of the hidden layers (paper: 32).
    num_layers: conv layers in all, the last mapping to the input's channels
      (paper: 8).
    conv_lowering: conv lowering (see ``layers``).
  """

  features: int = 32
  num_layers: int = 8
  conv_lowering: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Denoises ``x``; ``train`` is unused (the common model signature)."""
    del train
    if x.ndim != 4:
      raise ValueError(f"the WGAN-VGG generator takes (B, H, W, C) images, got {x.shape}")
    if self.num_layers < 2:
      raise ValueError(f"num_layers must be >= 2, got {self.num_layers}")
    h = x
    for index in range(self.num_layers):
      last = index == self.num_layers - 1
      h = Conv(x.shape[-1] if last else self.features, (3, 3), padding="SAME",
               lowering=self.conv_lowering, name=f"conv{index + 1}")(h)
      h = nn.relu(h)
    return h
