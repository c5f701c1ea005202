r"""DnCNN trained on the built-in LDCT alone with SURE for FBP-domain CT noise (issue 15).

  python -m ldct_jax.main --config=configs/ct_sure.py
  python -m ldct_jax.main --config=configs/ct_sure.py:white      # plain SURE (biased)
  python -m ldct_jax.main --config=configs/ct_sure.py:mse        # true pairs, the baseline

No NDCT is read by the training step: the patch stream cuts the quarter-dose
image and its noise probes only (``methods/sure.py``). The validation
patients' NDCT ranks checkpoints (model selection only), and the CT
evaluator scores the test patients against NDCT, as for every method.

The noise model (``sure.noise='fbp'``): per training slice, ``num_probes``
independent draws of the FBP noise, made from the LDCT itself and the
scanner's physics (``sure.physics``; empty = the built-in data's spec: 5e5
full-dose photons per bin, dose 0.25, electronic noise sqrt(11) counts, ramp
FBP), combined with random unit weights in each step into a probe of the
noise's covariance. ``:white`` runs plain white-noise SURE with the same
mean noise variance, which ignores the correlation (docs/sure.md). Network
and schedule: ``configs/dncnn.py``'s CPU DnCNN, 1000 steps, sized to 15-20
minutes on 2 CPU cores; ``:paper`` the 17 x 64 DnCNN for a GPU. Measured
results (2026-12-01, experiments/sure_vs_mse.py at 300 steps, not the
default 1000; README "SURE"): 34.99 dB abdomen PSNR against 35.17 with MSE on
true pairs (LDCT 33.56); ``:white`` 27.45 dB.
"""
import ml_collections

from configs import dncnn

VARIANTS = ("white", "mse", "exact", "paper")


def get_config(variant: str = ""):
  parts = [p for p in variant.split("_") if p]
  unknown = [p for p in parts if p not in VARIANTS]
  if unknown:
    raise ValueError(f"unknown variant {variant!r} of configs/ct_sure.py (known: "
                     f"{', '.join(VARIANTS)}, combined with '_')")
  config = dncnn.get_config("paper" if "paper" in parts else "")
  config.method = "supervised" if "mse" in parts else "sure"
  config.sure = ml_collections.ConfigDict(dict(
      noise="fbp",
      fbp_probe="white" if "white" in parts else "correlated",
      num_probes=4,        # noise draws per training slice, made before training
      eps=0.0,             # finite-difference step, model units; 0 = sigma / sqrt(pixels per patch)
      probe="gaussian",    # white probes only: 'gaussian' | 'rademacher'
      divergence="exact" if "exact" in parts else "fd",
      # The scanner; all empty = the built-in data's spec (required for other data).
      physics=ml_collections.ConfigDict(dict(
          incident_flux=0.0, dose_fraction=0.0, electronic_noise_std=0.0, kernel="")),
  ))
  # No classical row (BM3D takes minutes on the 64 test slices; the CT table in the
  # README has it): --config.eval.classical=bm3d adds it.
  config.eval.classical = "none"
  if "paper" not in parts:
    config.train.update(dict(num_steps=1000, eval_every=250, checkpoint_every=250))
  return config
