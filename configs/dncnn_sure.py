r"""DnCNN trained with Monte-Carlo SURE on Gaussian-noisy CT slices, no clean image (issue 15).

  python -m ldct_jax.main --config=configs/dncnn_sure.py              # sigma = 25
  python -m ldct_jax.main --config=configs/dncnn_sure.py:s50
  python -m ldct_jax.main --config=configs/dncnn_sure.py:s15_mse      # the MSE baseline

The SURE papers' task (Soltanayev & Chun, NeurIPS 2018) on the built-in CT
slices: the NDCT clipped to the 'paper' window [-160, 240] HU is the clean
image, read on the [0, 255] scale of that window, and white Gaussian noise of
std σ on that scale (σ = 25: 39.2 HU) is added once per scan, for train,
val and test alike (``data.gaussian_noise``, ``ldct_jax/data/gaussian.py``).
The model input is that scale divided by 255 (``data.normalization``: the
window mapped to [0, 1]), as in the papers' code. The training stream cuts
the noisy image only (``methods/sure.py``); validation (checkpoint ranking)
uses the validation patients' clean images. The CT evaluator scores the
test patients unchanged: its 'ldct' row is the noisy input, and its PSNR in
the 'paper' window (clipped, data range 1) is the papers' PSNR on [0, 255]
(data range 255) of the clipped output.

Network: the CPU DnCNN of ``configs/dncnn.py`` (8 layers x 32 channels, batch
norm, identity-initialised noise head); ε of the finite difference
``σ/√N`` (``ldct_jax.sure``); 1000 steps of 16 64² patches, sized to
15-20 minutes on 2 CPU cores (a SURE step is two forward and two backward
passes). Variants (combine with '_'): ``s15``, ``s50`` (σ), ``mse`` (the same
network and data trained with MSE on the clean images: the baseline),
``exact`` (the divergence by a vector-Jacobian product, no finite difference),
``paper`` (17 x 64 DnCNN, 50k steps, batch 128: a GPU). Measured
(2026-12-01, experiments/sure_vs_mse.py at 300 steps, not the default 1000;
README "SURE"): SURE 33.35 / 30.19 / 25.13 dB against MSE 34.77 / 32.20 /
27.80 dB at σ = 15 / 25 / 50.
"""
import ml_collections

from configs import dncnn

VARIANTS = ("s15", "s25", "s50", "mse", "exact", "paper")


def get_config(variant: str = ""):
  parts = [p for p in variant.split("_") if p]
  unknown = [p for p in parts if p not in VARIANTS]
  if unknown:
    raise ValueError(f"unknown variant {variant!r} of configs/dncnn_sure.py (known: "
                     f"{', '.join(VARIANTS)}, combined with '_')")
  config = dncnn.get_config("paper" if "paper" in parts else "")
  sigma = 25.0
  for p in parts:
    if p.startswith("s") and p[1:].isdigit():
      sigma = float(p[1:])
  config.method = "supervised" if "mse" in parts else "sure"
  config.sure = ml_collections.ConfigDict(dict(
      noise="gaussian",
      eps=0.0,             # finite-difference step, model units; 0 = sigma / sqrt(pixels per patch)
      probe="gaussian",    # 'gaussian' | 'rademacher'
      divergence="exact" if "exact" in parts else "fd",
  ))
  # sigma on the [0, 255] scale of the window; noise drawn once per scan.
  config.data.gaussian_noise = ml_collections.ConfigDict(dict(sigma=sigma, window="paper",
                                                               seed=0))
  config.data.normalization = ml_collections.ConfigDict(dict(kind="window", window="paper"))
  # Clipped images have no air below -160 HU, so air rejection would never fire.
  config.data.skip_air_fraction = None
  config.eval.windows = ("paper",)  # = [0, 255], data range 255
  config.eval.texture = ()          # texture against a clipped NDCT says little here
  # No classical row by default: BM3D costs ~3 s per 256^2 slice on 2 cores.
  # experiments/sure_vs_mse.py adds BM3D given the true sigma; 'bm3d' here
  # would estimate sigma per slice (MAD).
  config.eval.classical = "none"
  if "paper" not in parts:
    config.train.update(dict(num_steps=1000, eval_every=250, checkpoint_every=250))
  return config
