"""RED-CNN: residual encoder-decoder CNN (Chen et al., IEEE TMI 36(12), 2017).

Encoder: ``num_layers`` VALID convolutions, each shrinking the image by
``kernel_size - 1``; decoder: ``num_layers`` stride-1 VALID transposed
convolutions growing it back. ReLU after every layer except where a shortcut
joins, where ReLU follows the sum. Shortcuts join mirrored positions (paper
size, ``num_layers=5``, layers numbered from 1):

  * input image           -> added to the output of deconv5 (the last layer),
  * output of conv2 (ReLU) -> added to the output of deconv3,
  * output of conv4 (ReLU) -> added to the output of deconv1,

i.e. the output of every even-numbered conv is added after the decoder layer
that restores its size, the same wiring as the paper's Fig. 1 and the public
PyTorch re-implementation (SSinyu/RED-CNN). For other ``num_layers`` the same
rule applies: conv ``2j`` feeds deconv ``num_layers - 2j`` when that exists.

Paper size (96 features, 5x5 kernels, 5 + 5 layers) has 1,848,865 parameters.
"""
from __future__ import annotations

import jax
from flax import linen as nn

from ldct_jax.models.layers import Conv, ConvTranspose


class REDCNN(nn.Module):
  """RED-CNN denoiser.

  Attributes:
    features: channels of every hidden layer (paper: 96).
    kernel_size: square kernel side (paper: 5).
    num_layers: conv layers, and as many transposed convs (paper: 5).
    conv_lowering: conv lowering passed to every layer (see ``layers``).
  """

  features: int = 96
  kernel_size: int = 5
  num_layers: int = 5
  conv_lowering: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Denoises ``x``.

    Args:
      x: ``(batch, height, width, channels)`` images, HU-normalised units.
        Height and width must exceed ``num_layers * (kernel_size - 1)``.
      train: unused (no batch norm or dropout); kept for the common
        model signature.

    Returns:
      Denoised images, same shape as ``x``. The final ReLU (as in the paper)
      makes outputs non-negative: inputs must be normalised so that the
      valid range is >= 0.
    """
    del train
    shrink = self.num_layers * (self.kernel_size - 1)
    if min(x.shape[1:3]) <= shrink:
      raise ValueError(f"RED-CNN with {self.num_layers} layers of "
                       f"{self.kernel_size}x{self.kernel_size} VALID convs "
                       f"needs images larger than {shrink} px, got "
                       f"{x.shape[1:3]}")
    kernel = (self.kernel_size, self.kernel_size)
    skips = {0: x}  # keyed by the encoder depth whose output they hold
    h = x
    for depth in range(1, self.num_layers + 1):
      h = nn.relu(Conv(self.features, kernel, padding="VALID",
                       lowering=self.conv_lowering, name=f"conv{depth}")(h))
      if depth % 2 == 0:
        skips[depth] = h
    for layer in range(1, self.num_layers + 1):
      out_features = self.features if layer < self.num_layers else x.shape[-1]
      h = ConvTranspose(out_features, kernel, padding="VALID",
                        lowering=self.conv_lowering, name=f"deconv{layer}")(h)
      # deconv `layer` restores the size of encoder depth num_layers - layer.
      mirrored = self.num_layers - layer
      if mirrored in skips:
        h = h + skips[mirrored]
      h = nn.relu(h)
    return h
