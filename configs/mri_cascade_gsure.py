r"""Deep cascade trained from undersampled, noisy k-space only, with generalised SURE (issue 15).

  python -m ldct_jax.main --config=configs/mri_cascade_gsure.py
  python -m ldct_jax.main --config=configs/mri_cascade_gsure.py:paper

The network and data of ``configs/mri_cascade.py`` (D5-C5 at 32 filters, R = 4
1D random masks, the built-in MNI152 + phantom k-space), trained by
``methods/mri_gsure.py``: each training slice is measured under ONE mask
(``mri_gsure.mask_seed``), its fully sampled reference never reaches the
step, and the loss is GSURE in the range of the measurement operator with
``mri_gsure.holdout`` = 0.4 of the measured non-centre columns held out per
step (SSDU's split, Yaman et al. 2020). The data consistency is the noisy
one (λ learnt), so the divergence term acts on the seen samples' noise;
``:harddc`` uses exact replacement (GSURE then scores the held-out columns
only). The k-space noise std is the built-in files' ``noise_std`` attribute
(1% of the volume maximum); give ``--config.mri_gsure.noise_std`` for other
data. Validation (checkpoint ranking) uses the validation subjects' fully
sampled references, as the supervised run's does. 400 steps, sized to 15-20
minutes on 2 CPU cores (a GSURE step costs 2.1 supervised ones: 6.3 s
against 3.0 s on a loaded 2-core machine); ``:paper`` is the GPU size of
``configs/mri_cascade.py:paper``.
Measured (2026-12-01, experiments/sure_vs_mse.py at 300 steps, R = 4;
README "SURE"): 22.04 dB against 23.21 supervised (zero-filled 19.45).
"""
import ml_collections

from configs import mri_cascade

OWN_VARIANTS = ("harddc",)


def get_config(variant: str = ""):
  parts = [p for p in variant.split("_") if p]
  passed = [p for p in parts if p not in OWN_VARIANTS]
  unknown = [p for p in passed if p not in mri_cascade.VARIANTS]
  if unknown:
    raise ValueError(f"unknown variant {variant!r} of configs/mri_cascade_gsure.py (known: "
                     f"{', '.join(mri_cascade.VARIANTS + OWN_VARIANTS)}, combined with '_')")
  config = mri_cascade.get_config("_".join(passed))
  config.method = "mri_gsure"
  config.model.noisy_dc = "harddc" not in parts
  config.mri_gsure = ml_collections.ConfigDict(dict(
      holdout=0.4,        # chance that a measured non-centre column is hidden from the input
      noise_std=0.0,      # complex k-space noise std (file units); 0 = the files' attribute
      eps=0.0,            # finite-difference step (scaled units); 0 = s / sqrt(measured reals)
      divergence="fd",    # 'fd' (second forward pass) | 'exact' (a vector-Jacobian product)
      mask_seed=0,        # the one mask of every training slice
  ))
  if "paper" not in parts:
    config.train.update(dict(num_steps=400, eval_every=200, checkpoint_every=200))
  return config
