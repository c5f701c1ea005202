"""MRI acquisition physics: centred orthonormal FFTs, undersampling masks, SENSE, data consistency.

Conventions (fastMRI's, so numbers and files are comparable with theirs):

* Images and k-space are complex arrays whose LAST TWO axes are (H, W); any
  leading axes (batch, slices, coils) are carried along. ``fft2c`` is the
  centred orthonormal 2D DFT ``fftshift(fft2(ifftshift(x), norm='ortho'))``,
  so k-space has its DC sample at index ``(H // 2, W // 2)`` and Parseval
  holds: ``sum |x|^2 == sum |fft2c(x)|^2``. ``ifft2c`` is its inverse and its
  adjoint.
* The phase-encode direction is the LAST axis (W): 1D Cartesian masks select
  columns, as fastMRI's ``RandomMaskFunc`` / ``EquispacedMaskFunc`` do.
* At the network boundary complex arrays become float32 with a trailing
  channel axis ``(..., H, W, 2)`` holding (real, imag), i.e. NHWC
  (``complex_to_channels`` / ``channels_to_complex``).
* Physics functions are pure ``jnp`` (jit-able, differentiable). Masks are
  NumPy arrays built on the host from a seed, so a mask is reproducible and
  can be stored next to the numbers it produced.

Masks (``make_mask``) for acceleration R:

* ``'random'``: fastMRI's ``RandomMaskFunc`` rule. ``n_c = round(W * cf)``
  fully sampled centre columns, every other column kept with probability
  ``(W / R - n_c) / (W - n_c)``, so R holds on average over seeds.
* ``'equispaced'``: fastMRI's ``EquispacedMaskFunc`` rule: the same centre,
  plus every ``R'``-th column from a random offset, with the spacing ``R'``
  adjusted so that centre plus equispaced columns give R.
* ``'variable_density_2d'``: 2D random sampling (for 3D Cartesian or
  simulation studies) with a polynomial density ``(1 - r)^p`` in the
  normalised k-space radius r, a fully sampled central disc of diameter
  ``cf * min(H, W)``, scaled so that the expected number of samples is
  ``H W / R``.

The default centre fraction is ``cf = 0.32 / R``: 8% at R=4 and 4% at R=8,
fastMRI's published pairs.

Data consistency (Schlemper et al., IEEE TMI 2017, eq. 7-9), with ``m`` the
mask, ``k`` the network's k-space and ``k0`` the measurement (zero off the
mask):

* noiseless: ``k <- (1 - m) k + m k0`` (the sampled entries are replaced);
* noisy: ``k <- (1 - m) k + m (k + lam k0) / (1 + lam)``; ``lam -> inf``
  gives the noiseless layer. Its Jacobian w.r.t. ``k`` is the diagonal
  ``(1 - m) + m / (1 + lam)`` and its derivative w.r.t. ``lam`` is
  ``m (k0 - k) / (1 + lam)^2``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np
from jax import lax

_AXES = (-2, -1)
MASK_KINDS = ("random", "equispaced", "variable_density_2d")


def fft2c(x) -> jnp.ndarray:
  """Centred orthonormal 2D DFT over the last two axes (image -> k-space)."""
  x = jnp.asarray(x)
  return jnp.fft.fftshift(
      jnp.fft.fft2(jnp.fft.ifftshift(x, axes=_AXES), axes=_AXES, norm="ortho"), axes=_AXES)


def ifft2c(k) -> jnp.ndarray:
  """Centred orthonormal 2D inverse DFT over the last two axes (k-space -> image)."""
  k = jnp.asarray(k)
  return jnp.fft.fftshift(
      jnp.fft.ifft2(jnp.fft.ifftshift(k, axes=_AXES), axes=_AXES, norm="ortho"), axes=_AXES)


def complex_to_channels(z) -> jnp.ndarray:
  """``(..., H, W)`` complex -> ``(..., H, W, 2)`` float32 (real, imag)."""
  z = jnp.asarray(z)
  return jnp.stack([jnp.real(z), jnp.imag(z)], axis=-1).astype(jnp.float32)


def channels_to_complex(x) -> jnp.ndarray:
  """``(..., H, W, 2)`` (real, imag) -> ``(..., H, W)`` complex64 (complex128 from float64)."""
  x = jnp.asarray(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  if x.shape[-1] != 2:
    raise ValueError(f"expected a trailing (real, imag) axis of size 2, got shape {x.shape}")
  return lax.complex(x[..., 0], x[..., 1])


# --------------------------------------------------------------------------- masks


def default_center_fraction(acceleration: float) -> float:
  """fastMRI's centre fraction for R: 0.08 at 4x and 0.04 at 8x (``0.32 / R``)."""
  return 0.32 / float(acceleration)


def _check_acceleration(acceleration: float) -> float:
  acceleration = float(acceleration)
  if not acceleration >= 1.0:
    raise ValueError(f"acceleration must be >= 1, got {acceleration}")
  return acceleration


def _centre_columns(width: int, center_fraction: float) -> Tuple[int, int]:
  """``(start, count)`` of the fully sampled centre, placed as fastMRI places it."""
  count = int(round(width * center_fraction))
  return (width - count + 1) // 2, count


def random_columns(width: int, acceleration: float, center_fraction: Optional[float] = None,
                   seed: int = 0) -> np.ndarray:
  """1D random Cartesian mask over ``width`` phase-encode columns, ``(W,)`` bool.

  fastMRI's ``RandomMaskFunc``: ``n_c = round(W cf)`` centre columns, the rest
  kept independently with probability ``(W / R - n_c) / (W - n_c)``.
  """
  acceleration = _check_acceleration(acceleration)
  cf = default_center_fraction(acceleration) if center_fraction is None else center_fraction
  start, count = _centre_columns(width, cf)
  if count > width / acceleration:
    raise ValueError(f"centre fraction {cf} keeps {count} of {width} columns, more than "
                     f"W/R = {width / acceleration:.1f} at R={acceleration}")
  rng = np.random.default_rng(seed)
  prob = (width / acceleration - count) / max(width - count, 1)
  mask = rng.uniform(size=width) < prob
  mask[start:start + count] = True
  return mask


def equispaced_columns(width: int, acceleration: float, center_fraction: Optional[float] = None,
                       seed: int = 0) -> np.ndarray:
  """1D equispaced Cartesian mask, ``(W,)`` bool (fastMRI's ``EquispacedMaskFunc`` rule).

  The spacing is adjusted to ``R (n_c - W) / (n_c R - W)`` so that the
  centre plus the equispaced columns give about ``W / R`` columns; the offset
  of the first column is drawn from the seed.
  """
  acceleration = _check_acceleration(acceleration)
  cf = default_center_fraction(acceleration) if center_fraction is None else center_fraction
  start, count = _centre_columns(width, cf)
  if count >= width / acceleration:
    raise ValueError(f"centre fraction {cf} keeps {count} of {width} columns, not fewer than "
                     f"W/R = {width / acceleration:.1f} at R={acceleration}")
  spacing = acceleration * (count - width) / (count * acceleration - width)
  rng = np.random.default_rng(seed)
  offset = int(rng.integers(0, max(int(round(spacing)), 1)))
  mask = np.zeros(width, dtype=bool)
  mask[np.around(np.arange(offset, width - 1, spacing)).astype(np.int64)] = True
  mask[start:start + count] = True
  return mask


def variable_density_2d(shape: Sequence[int], acceleration: float,
                        center_fraction: Optional[float] = None, seed: int = 0,
                        power: float = 2.0) -> np.ndarray:
  """2D variable-density random mask, ``(H, W)`` bool.

  Density ``p(r) = (1 - r)^power`` with r the k-space radius normalised to 1
  at the corners; a disc of diameter ``cf * min(H, W)`` around DC is fully
  sampled; the density elsewhere is scaled (by bisection, probabilities
  clipped to 1) so that the expected number of samples is ``H W / R``.
  """
  acceleration = _check_acceleration(acceleration)
  cf = default_center_fraction(acceleration) if center_fraction is None else center_fraction
  height, width = (int(s) for s in shape)
  ky = np.arange(height) - height // 2
  kx = np.arange(width) - width // 2
  radius = np.hypot(ky[:, None] / (height / 2), kx[None, :] / (width / 2)) / np.sqrt(2.0)
  centre = np.hypot(ky[:, None], kx[None, :]) <= cf * min(height, width) / 2
  target = height * width / acceleration
  if centre.sum() > target:
    raise ValueError(f"centre disc of {int(centre.sum())} samples exceeds HW/R = {target:.0f}")
  density = np.where(centre, 0.0, (1.0 - np.clip(radius, 0.0, 1.0)) ** power)

  def expected(scale):
    return centre.sum() + np.minimum(scale * density, 1.0).sum()

  low, high = 0.0, 1.0
  while expected(high) < target and high < 1e12:
    high *= 2.0
  for _ in range(100):
    mid = 0.5 * (low + high)
    low, high = (mid, high) if expected(mid) < target else (low, mid)
  prob = np.where(centre, 1.0, np.minimum(high * density, 1.0))
  rng = np.random.default_rng(seed)
  return rng.uniform(size=(height, width)) < prob


def make_mask(kind: str, shape: Sequence[int], acceleration: float,
              center_fraction: Optional[float] = None, seed: int = 0) -> np.ndarray:
  """An undersampling mask of ``shape = (H, W)``, float32 0/1, reproducible from ``seed``.

  ``kind`` is one of ``MASK_KINDS`` (see the module docstring). Column masks
  are broadcast over the H rows, so every kind returns a full ``(H, W)``
  array that multiplies k-space directly.
  """
  height, width = (int(s) for s in shape)
  if kind == "random":
    mask = np.broadcast_to(random_columns(width, acceleration, center_fraction, seed),
                           (height, width))
  elif kind == "equispaced":
    mask = np.broadcast_to(equispaced_columns(width, acceleration, center_fraction, seed),
                           (height, width))
  elif kind == "variable_density_2d":
    mask = variable_density_2d((height, width), acceleration, center_fraction, seed)
  else:
    raise ValueError(f"unknown mask kind {kind!r}; known: {MASK_KINDS}")
  return np.array(mask, dtype=np.float32)


# ----------------------------------------------------------------- forward models


def _real_mask(mask, like) -> jnp.ndarray:
  """The mask in the real dtype matching complex ``like`` (float32 for complex64)."""
  return jnp.asarray(mask).astype(jnp.finfo(like.dtype).dtype)


def masked_fft(x, mask) -> jnp.ndarray:
  """Single-coil forward model ``A x = M F x``: image -> undersampled k-space."""
  k = fft2c(x)
  return k * _real_mask(mask, k)


def masked_ifft(k, mask) -> jnp.ndarray:
  """Adjoint of ``masked_fft``: ``A^H k = F^H M k``."""
  k = jnp.asarray(k)
  return ifft2c(k * _real_mask(mask, k))


def zero_filled(k, mask=None) -> jnp.ndarray:
  """Zero-filled reconstruction ``F^H M k`` (complex); without a mask, ``F^H k``."""
  return ifft2c(k) if mask is None else masked_ifft(k, mask)


def center_crop(x, size: Sequence[int]) -> jnp.ndarray:
  """Central ``(h, w)`` window of the last two axes, as fastMRI's ``center_crop``.

  Works on complex images and on magnitudes. The window starts at
  ``(H - h) // 2``; ``h <= H`` and ``w <= W`` are required.
  """
  h, w = (int(s) for s in size)
  height, width = x.shape[-2], x.shape[-1]
  if h > height or w > width:
    raise ValueError(f"cannot crop ({height}, {width}) to larger ({h}, {w})")
  top, left = (height - h) // 2, (width - w) // 2
  return x[..., top:top + h, left:left + w]


def magnitude_image(k, size: Optional[Sequence[int]] = None, mask=None) -> jnp.ndarray:
  """fastMRI's single-coil reconstruction: ``|F^H (M) k|`` centre-cropped to ``size``."""
  image = jnp.abs(zero_filled(k, mask))
  return image if size is None else center_crop(image, size)


def sense_forward(x, maps, mask) -> jnp.ndarray:
  """Multi-coil SENSE forward ``A x = M F (S_c x)``.

  Args:
    x: ``(..., H, W)`` complex image.
    maps: ``(..., C, H, W)`` complex coil sensitivities.
    mask: broadcastable to ``(..., C, H, W)``, e.g. ``(H, W)``.

  Returns:
    ``(..., C, H, W)`` undersampled multi-coil k-space.
  """
  x = jnp.asarray(x)
  return masked_fft(jnp.asarray(maps) * x[..., None, :, :], mask)


def sense_adjoint(k, maps, mask) -> jnp.ndarray:
  """Adjoint of ``sense_forward``: ``A^H k = sum_c conj(S_c) F^H M k_c``, ``(..., H, W)``."""
  return jnp.sum(jnp.conj(jnp.asarray(maps)) * masked_ifft(k, mask), axis=-3)


# -------------------------------------------------------------- data consistency


def data_consistency(k, k0, mask, lam=None) -> jnp.ndarray:
  """Schlemper et al.'s DC layer in k-space (see the module docstring).

  Args:
    k: ``(..., H, W)`` complex k-space of the network's image.
    k0: measured k-space, same shape, zero where not sampled.
    mask: 0/1 mask broadcastable to ``k``.
    lam: None for the noiseless layer; otherwise the noise weight ``lam > 0``
      (scalar or broadcastable array) of the noisy layer.
  """
  k, k0 = jnp.asarray(k), jnp.asarray(k0)
  m = _real_mask(mask, k)
  if lam is None:
    return (1.0 - m) * k + m * k0
  lam = jnp.asarray(lam)
  return (1.0 - m) * k + m * (k + lam * k0) / (1.0 + lam)


def dc_image(x, k0, mask, lam=None) -> jnp.ndarray:
  """Image-domain DC: ``ifft2c(data_consistency(fft2c(x), k0, mask, lam))``."""
  return ifft2c(data_consistency(fft2c(x), k0, mask, lam))
