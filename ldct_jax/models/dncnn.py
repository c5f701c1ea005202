"""DnCNN: residual noise learning (Zhang et al., IEEE TIP 26(7), 2017).

``depth`` 3x3 'SAME' conv layers: conv + ReLU; ``depth - 2`` x (conv without
bias + batch norm + ReLU); conv to the input's channels. The network predicts
the noise, and the output is ``input - predicted noise``.

Dilated variant (``dilated=True``): layer ``i`` (0-based) uses dilation
``1 + min(i % 6, 6 - i % 6)``, a triangle wave 1,2,3,4,3,2,1,2,3,... . With
``depth=7`` this is exactly the 1,2,3,4,3,2,1 schedule of the dilated residual
denoisers (Zhang et al. IRCNN, CVPR 2017; Gholizadeh-Ansari et al., J. Digit.
Imaging 2020, for LDCT), which reach the receptive field (33 px) of a 16-layer
plain DnCNN with 7 layers. Padding is 'SAME', so sizes never change.
"""
from __future__ import annotations

import jax
from flax import linen as nn

from ldct_jax.models.layers import Conv

# Triangle-wave period of the dilated schedule: rise 1..4 and fall back.
_DILATION_PERIOD = 6


def dilation_schedule(depth: int, dilated: bool) -> tuple:
  """Kernel dilation of each of the ``depth`` layers."""
  if not dilated:
    return (1,) * depth
  phases = (i % _DILATION_PERIOD for i in range(depth))
  return tuple(1 + min(phase, _DILATION_PERIOD - phase) for phase in phases)


class DnCNN(nn.Module):
  """DnCNN denoiser.

  Attributes:
    depth: conv layers in total (paper: 17 for known-sigma denoising).
    features: channels of the hidden layers (paper: 64).
    use_bn: batch norm in the middle layers (paper: True). Its statistics
      live in the ``batch_stats`` collection; pass ``mutable=['batch_stats']``
      to ``apply`` when ``train=True``.
    dilated: use the dilation schedule of ``dilation_schedule``.
    conv_lowering: conv lowering passed to every layer (see ``layers``).
    bn_momentum: running-average decay of the batch statistics (Flax
      convention; PyTorch's momentum 0.1 is 0.9 here).
    bn_epsilon: batch-norm variance epsilon.
    identity_init: the noise-predicting last conv starts at zero, so the
      untrained net is the identity (as ``gcn.GCNDenoiser``'s). With LeCun
      init the random noise estimate makes the net start worse than its
      input: the 1500-step CPU default then ended 0.97 dB BELOW its LDCT
      input, and 3.09 dB above it with this init (README).
  """

  depth: int = 17
  features: int = 64
  use_bn: bool = True
  dilated: bool = False
  conv_lowering: str = "auto"
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  identity_init: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Denoises ``x``.

    Args:
      x: ``(batch, height, width, channels)`` images, HU-normalised units.
      train: batch norm uses batch statistics and updates ``batch_stats``
        when True, and uses the running averages when False.

    Returns:
      ``x - noise``, same shape as ``x``.
    """
    if self.depth < 2:
      raise ValueError(f"DnCNN needs depth >= 2, got {self.depth}")
    dilations = dilation_schedule(self.depth, self.dilated)
    h = nn.relu(Conv(self.features, (3, 3), kernel_dilation=dilations[0],
                     lowering=self.conv_lowering, name="conv_in")(x))
    for layer, dilation in enumerate(dilations[1:-1], start=1):
      # Batch norm's shift makes a conv bias redundant.
      h = Conv(self.features, (3, 3), kernel_dilation=dilation,
               use_bias=not self.use_bn, lowering=self.conv_lowering,
               name=f"conv{layer}")(h)
      if self.use_bn:
        h = nn.BatchNorm(use_running_average=not train,
                         momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                         name=f"bn{layer}")(h)
      h = nn.relu(h)
    out_init = nn.initializers.zeros_init() if self.identity_init else nn.initializers.lecun_normal()
    noise = Conv(x.shape[-1], (3, 3), kernel_dilation=dilations[-1], kernel_init=out_init,
                 lowering=self.conv_lowering, name="conv_out")(h)
    return x - noise
