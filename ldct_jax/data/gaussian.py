r"""The Gaussian-noise task on CT slices (``data.gaussian_noise``), as the SURE papers pose it.

Soltanayev & Chun (NeurIPS 2018) and DnCNN train and score on 8-bit images
in [0, 255] with white Gaussian noise of std σ on that scale (σ = 15, 25,
50). To pose the same task on CT, this option replaces each scan's pair by

* ``'nd'``: the NDCT clipped to a HU window ``[low, high]`` (the clean image;
  on the scale ``255 (HU − low) / (high − low)`` it lies in [0, 255] as an
  8-bit photograph does);
* ``'ld'``: that clean image plus white Gaussian noise of std
  ``σ (high − low) / 255`` HU (σ on the [0, 255] scale), unclipped, drawn
  once per scan (seeded by ``seed`` and the scan's key, so every run, split
  and process sees the same noisy images, as the papers' "noise added once").

for train, val and test alike, so the CT task's evaluator scores the
Gaussian task unchanged: its 'ldct' row is the noisy input, and PSNR in the
window ``[low, high]`` (clipped, data range 1) is the papers' PSNR on
[0, 255] (data range 255) of the clipped output. The default window is
'paper' ([-160, 240] HU, the RED-CNN/WGAN-VGG metric range): σ = 25 is then
39.2 HU, near the quarter-dose noise of the built-in data. An NDCT-only tree
(``dose='full'``) becomes a paired Gaussian dataset the same way.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from ldct_jax import windows
from ldct_jax.data.pipeline import Volume

# 8-bit photographs: the scale on which the papers' sigma is given.
PIXEL_RANGE = 255.0


def sigma_hu(sigma: float, window) -> float:
  """σ on the [0, 255] scale of ``window`` -> HU."""
  return float(sigma) * windows.get_window(window).width / PIXEL_RANGE


def with_gaussian_noise(dataset, *, sigma: float, window="paper", seed: int = 0):
  """The dataset with every scan's pair replaced as the module docstring says.

  Args:
    dataset: a ``CTDataset`` whose volumes hold 'nd' (paired or NDCT-only).
    sigma: noise std on the [0, 255] scale of ``window``; must be positive.
    window: HU window mapped to [0, 255] (preset name, (center, width) or dict).
    seed: noise seed; the noise of a scan depends on it and the scan's key only.

  Returns:
    A new ``CTDataset`` (``dose='paired'``) with float32 'ld' and 'nd' HU arrays.
  """
  if not float(sigma) > 0:
    raise ValueError(f"data.gaussian_noise.sigma must be positive, got {sigma}")
  w = windows.get_window(window)
  std = sigma_hu(sigma, w)
  volumes = {}
  for key, volume in dataset.volumes.items():
    if "nd" not in volume.arrays:
      raise ValueError(f"data.gaussian_noise: scan {key!r} has no NDCT to add noise to")
    clean = np.clip(volume.arrays["nd"], w.low, w.high)
    rng = np.random.default_rng([int(seed), zlib.crc32(key.encode())])
    noisy = clean + std * rng.standard_normal(clean.shape)
    volumes[key] = Volume(volume.patient_id, {"ld": noisy, "nd": clean})
  return dataclasses.replace(dataset, volumes=volumes, dose="paired")


def apply_config(dataset, data_cfg):
  """``with_gaussian_noise`` when ``data.gaussian_noise.sigma > 0``, else ``dataset``."""
  options = data_cfg.get("gaussian_noise") or {}
  if not float(options.get("sigma", 0.0) or 0.0) > 0:
    return dataset
  return with_gaussian_noise(dataset, sigma=float(options["sigma"]),
                             window=options.get("window", "paper"),
                             seed=int(options.get("seed", 0)))
