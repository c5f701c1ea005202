"""Training losses for image denoising, as pure ``jax.numpy`` functions.

Every loss takes ``(pred, target, ...)`` arrays and returns a scalar: the mean
over the batch (and over pixels where the loss is pixel-wise). Losses built on
SSIM take images in NHWC ``(B, H, W, C)`` and an explicit ``data_range`` (1 for
[0, 1]-normalised images), and reuse ``ldct_jax.metrics`` so that the loss and
the reported metric are the same function. ``LOSSES`` / ``get_loss`` let a
config choose a loss by name.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

import jax.numpy as jnp

from ldct_jax import metrics


def _abs(x) -> jnp.ndarray:
  """``|x|`` whose JAX gradient at 0 is 0, the minimum-norm subgradient.

  ``jnp.abs`` differentiates to +1 at 0, so ``pred == target`` would not be a
  stationary point of the L1 terms; ``sign(x) * x`` differentiates to
  ``sign(x)``.
  """
  return jnp.sign(x) * x


def l1_loss(pred, target) -> jnp.ndarray:
  """Mean absolute error over all elements, in the units of the inputs.

  Its gradient is ``sign(pred - target) / size``, 0 where ``pred == target``.
  """
  return jnp.mean(_abs(pred - target))


def l2_loss(pred, target) -> jnp.ndarray:
  """Mean squared error over all elements, in squared units of the inputs."""
  return jnp.mean(jnp.square(pred - target))


def charbonnier_loss(pred, target, eps: float = 1e-3) -> jnp.ndarray:
  """Charbonnier (smooth L1) loss, ``mean(sqrt((pred - target)^2 + eps^2))``.

  Behaves like L2 for errors below ``eps`` and like L1 above, so its gradient is
  smooth at zero error (Lai et al. 2017 use ``eps = 1e-3`` on [0, 1] images).
  ``eps`` is in the units of the inputs; the loss is ``eps``, not 0, at
  ``pred == target``, and its gradient there is 0.
  """
  return jnp.mean(jnp.sqrt(jnp.square(pred - target) + eps**2))


def ssim_loss(pred, target, data_range, *, win_size: int = 11, sigma: float = 1.5,
              k1: float = 0.01, k2: float = 0.03) -> jnp.ndarray:
  """``1 - SSIM`` averaged over the batch; NHWC images, options as ``metrics.ssim``."""
  return jnp.mean(1.0 - metrics.ssim(pred, target, data_range, win_size=win_size,
                                     sigma=sigma, k1=k1, k2=k2))


def ms_ssim_loss(pred, target, data_range,
                 weights: Sequence[float] = metrics.MS_SSIM_WEIGHTS, *,
                 win_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
                 k2: float = 0.03) -> jnp.ndarray:
  """``1 - MS-SSIM`` averaged over the batch; NHWC images, options as ``metrics.ms_ssim``.

  Images need ``H, W >= metrics.ms_ssim_min_size(len(weights))`` (176 px for
  the default 5 scales); for 64x64 training patches pass 3 weights.
  """
  return jnp.mean(1.0 - metrics.ms_ssim(pred, target, data_range, weights,
                                        win_size=win_size, sigma=sigma, k1=k1, k2=k2))


def mix_loss(pred, target, data_range, alpha: float = 0.84,
             weights: Sequence[float] = metrics.MS_SSIM_WEIGHTS, *,
             win_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
             k2: float = 0.03) -> jnp.ndarray:
  """MS-SSIM + Gaussian-weighted L1 mix of Zhao et al. (IEEE TCI 2017).

  Per image ``alpha (1 - MS-SSIM) + (1 - alpha) mean(G_sigma * |pred -
  target|) / data_range``, averaged over the batch. The L1 map is weighted by
  the same Gaussian window SSIM uses and averaged over the same cropped
  interior, so both terms see the same pixels; dividing by ``data_range`` makes
  it dimensionless like MS-SSIM. Zhao et al. weight L1 with the Gaussian of
  their coarsest scale because their MS-SSIM changes sigma per scale without
  downsampling; ours downsamples (Wang et al.), so every scale uses ``sigma``.
  Averaged over an image the Gaussian weighting only reweights the crop
  border (the reflect-padded filter preserves sums), so this is close to
  ``alpha (1 - MS-SSIM) + (1 - alpha) L1 / data_range``.

  Args:
    pred: predicted images, NHWC ``(B, H, W, C)``.
    target: reference images, same shape and intensity scale.
    data_range: max - min of the intensity scale; scalar or ``(B,)``.
    alpha: weight of the MS-SSIM term (0.84 in Zhao et al.).
    weights: MS-SSIM scale weights; their number sets the minimum image size
      (``metrics.ms_ssim_min_size``).
    win_size: odd SSIM window size (crop).
    sigma: Gaussian standard deviation in pixels for SSIM and the L1 weights.
    k1: SSIM luminance constant.
    k2: SSIM contrast constant.

  Returns:
    Scalar loss.
  """
  structural = metrics.ms_ssim(pred, target, data_range, weights,
                               win_size=win_size, sigma=sigma, k1=k1, k2=k2)
  border = (win_size - 1) // 2
  weighted_l1 = metrics.gaussian_blur(_abs(pred - target), sigma)
  weighted_l1 = weighted_l1[:, border:weighted_l1.shape[1] - border,
                            border:weighted_l1.shape[2] - border, :]
  data_range = jnp.asarray(data_range, weighted_l1.dtype)
  l1_term = jnp.mean(weighted_l1, axis=(1, 2, 3)) / data_range
  return jnp.mean(alpha * (1.0 - structural) + (1.0 - alpha) * l1_term)


LOSSES = {
    "l1": l1_loss,
    "l2": l2_loss,
    "ssim": ssim_loss,
    "ms_ssim": ms_ssim_loss,
    "mix": mix_loss,
    "charbonnier": charbonnier_loss,
}


def get_loss(name: str, **kwargs) -> Callable:
  """Returns ``loss(pred, target) -> scalar`` for a registered loss name.

  ``kwargs`` fix the loss's other arguments (``data_range`` is required for
  'ssim', 'ms_ssim' and 'mix'); they are checked here, so a config error shows
  at start-up rather than at the first training step.

  Raises:
    ValueError: for an unknown name or arguments the loss does not accept.
  """
  try:
    loss_fn = LOSSES[name]
  except KeyError:
    raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)}") from None
  try:
    inspect.signature(loss_fn).bind(None, None, **kwargs)
  except TypeError as error:
    raise ValueError(f"bad arguments for loss {name!r}: {error}") from None
  return functools.partial(loss_fn, **kwargs)
