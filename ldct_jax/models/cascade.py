"""Deep cascade of CNNs with data consistency for undersampled MRI (Schlemper et al., IEEE TMI 2017).

The network alternates ``num_cascades`` times (n_c) between

1. a residual CNN of ``depth`` (n_d) 3x3 conv layers: ``n_d - 1`` conv + ReLU
   layers with ``features`` channels and a last conv back to the 2 channels
   (real, imag), added to the cascade's input;
2. a data-consistency (DC) layer (``physics.mri.data_consistency``) that puts
   the measured k-space back at the sampled positions: replaced exactly
   (noiseless, the default), or averaged with the network's k-space with a
   learnt weight ``lam > 0`` (``noisy_dc=True``).

D5-C5 (the defaults: 5 cascades of 5 layers, 64 filters) is the paper's
common configuration. Complex images cross the network boundary as float32
NHWC arrays with 2 channels (real, imag); the FFTs of the DC layer are the
centred orthonormal ones of ``physics.mri``.

Options:

* ``share_weights``: one CNN (and one ``lam``) for every cascade, n_c times
  fewer parameters.
* ``remat``: ``nn.remat`` on each cascade, so the backward pass recomputes a
  cascade's activations instead of keeping them: memory of about one cascade
  instead of n_c, for ~one extra forward pass of compute. Outputs and
  gradients are unchanged.
* ``identity_init`` (default True): the last conv of every CNN starts at
  zero, so the untrained network returns its zero-filled input (which is
  already data-consistent). As for ``dncnn.DnCNN``, this keeps the untrained
  net from starting worse than its input; the other layers get gradients from
  the first step on, through the last conv's weight gradient.
* ``lam_init`` (noisy DC only, default 10): ``lam`` is ``softplus`` of a raw
  parameter (positive for any raw value), initialised to ``lam_init``. At 10
  the layer starts near hard replacement (weight 10/11 on the measurement),
  trusting the data, and training learns how far to trust noisy samples.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ldct_jax.models.layers import Conv
from ldct_jax.physics import mri


def _inverse_softplus(value: float) -> float:
  return float(np.log(np.expm1(value)))


class CascadeCNN(nn.Module):
  """One cascade's residual CNN on ``(B, H, W, 2)`` images."""

  depth: int = 5
  features: int = 64
  identity_init: bool = True
  conv_lowering: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = x
    for layer in range(self.depth - 1):
      h = nn.relu(Conv(self.features, (3, 3), lowering=self.conv_lowering,
                       name=f"conv{layer}")(h))
    out_init = nn.initializers.zeros_init() if self.identity_init else nn.initializers.lecun_normal()
    return x + Conv(x.shape[-1], (3, 3), kernel_init=out_init, lowering=self.conv_lowering,
                    name=f"conv{self.depth - 1}")(h)


class CascadeBlock(nn.Module):
  """CNN then DC: one cascade. ``k0`` is complex ``(B, H, W)``, ``mask`` broadcastable to it."""

  depth: int = 5
  features: int = 64
  noisy_dc: bool = False
  lam_init: float = 10.0
  identity_init: bool = True
  conv_lowering: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, k0: jax.Array, mask: jax.Array) -> jax.Array:
    x = CascadeCNN(self.depth, self.features, self.identity_init, self.conv_lowering,
                   name="cnn")(x)
    lam = None
    if self.noisy_dc:
      raw = self.param("dc_lambda_raw", nn.initializers.constant(_inverse_softplus(self.lam_init)),
                       ())
      lam = nn.softplus(raw)
    return mri.complex_to_channels(mri.dc_image(mri.channels_to_complex(x), k0, mask, lam))


class DeepCascade(nn.Module):
  """Deep cascade CNN (Schlemper et al. 2017); see the module docstring.

  Attributes:
    num_cascades: n_c, CNN + DC blocks (paper: 5).
    depth: n_d, conv layers per CNN (paper: 5), at least 2.
    features: channels of the hidden conv layers (paper: 64).
    share_weights: one CNN (and ``lam``) shared by all cascades.
    remat: rematerialise each cascade in the backward pass (``nn.remat``).
    noisy_dc: learnt-``lam`` DC instead of exact replacement.
    lam_init: initial ``lam`` of the noisy DC.
    identity_init: zero-initialised last conv (untrained net = identity).
    conv_lowering: conv lowering of every layer (see ``models.layers``).
  """

  num_cascades: int = 5
  depth: int = 5
  features: int = 64
  share_weights: bool = False
  remat: bool = False
  noisy_dc: bool = False
  lam_init: float = 10.0
  identity_init: bool = True
  conv_lowering: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, k0: jax.Array, mask: jax.Array,
               train: bool = False) -> jax.Array:
    """Reconstructs images from undersampled k-space.

    Args:
      x: ``(B, H, W, 2)`` zero-filled images ``ifft2c(k0)`` as (real, imag).
      k0: ``(B, H, W, 2)`` measured k-space (zero where not sampled).
      mask: ``(B, H, W)`` or ``(B, 1, W)`` (or anything broadcastable to
        ``(B, H, W)``) 0/1 sampling mask, float or bool.
      train: unused (no batch norm or dropout); kept for the shared model
        call signature.

    Returns:
      ``(B, H, W, 2)`` reconstructed images, data-consistent with ``k0``.
    """
    del train
    if self.depth < 2 or self.num_cascades < 1:
      raise ValueError(f"DeepCascade needs depth >= 2 and num_cascades >= 1, got "
                       f"depth={self.depth}, num_cascades={self.num_cascades}")
    if x.ndim != 4 or x.shape[-1] != 2 or k0.shape != x.shape:
      raise ValueError(f"DeepCascade expects x and k0 of equal shape (B, H, W, 2), got "
                       f"{x.shape} and {k0.shape}")
    mask = jnp.asarray(mask)
    try:
      jnp.broadcast_shapes(mask.shape, x.shape[:-1])
    except ValueError:
      raise ValueError(f"mask of shape {mask.shape} does not broadcast to {x.shape[:-1]}") from None
    k0 = mri.channels_to_complex(k0)
    block_class = nn.remat(CascadeBlock) if self.remat else CascadeBlock
    options = dict(depth=self.depth, features=self.features, noisy_dc=self.noisy_dc,
                   lam_init=self.lam_init, identity_init=self.identity_init,
                   conv_lowering=self.conv_lowering)
    if self.share_weights:
      shared = block_class(**options, name="cascade")
      blocks = [shared] * self.num_cascades
    else:
      blocks = [block_class(**options, name=f"cascade{i}") for i in range(self.num_cascades)]
    for block in blocks:
      x = block(x, k0, mask)
    return x


def dc_lambdas(params) -> dict:
  """``{cascade name: lam}`` of a noisy-DC cascade's parameters (empty when noiseless)."""
  return {name: float(jax.nn.softplus(sub["dc_lambda_raw"]))
          for name, sub in params.items() if isinstance(sub, Mapping) and "dc_lambda_raw" in sub}
