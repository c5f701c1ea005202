r"""GCN blind denoiser (Chen et al., ICONIP 2020) on true LDCT/NDCT pairs, and its local control.

TDDL's denoiser (``configs/tddl.py``'s CPU size: 16 channels, 2 blocks, k = 8
neighbours in an 11x11 window) trained by the supervised method on the
built-in data's true quarter-dose pairs; no noise model:
  python -m ldct_jax.main --config=configs/gcn.py --workdir=runs/gcn
Not yet run as this file. The same network, data and optimiser are arm ``gcn /
a_true_pairs`` of ``experiments/tddl_ablation.py``, which validated (and so
picked its checkpoint) every 333 steps instead of 500 (README, measured
2026-11-21: 36.70 dB abdomen, 44.84 dB lung).

Variants (combine with '_', e.g. ``:local_blind``):
  :local   the control: ``gcn_local``, every graph convolution made local at
           equal depth, width and (within 0.3%) parameters, to test whether
           the non-local branch helps.
  :blind   each training patch takes its LDCT from one of the doses 0.05, 0.1,
           0.25 and 0.5, drawn uniformly per patch (``data.blind_doses``, as
           ``configs/redcnn.py:blind``; validation and evaluation on the quarter
           dose). The GCN paper's "blind" is this: one model for unknown noise
           levels. No measured result yet.
  python -m ldct_jax.main --config=configs/gcn.py:blind --workdir=runs/gcn_blind
  python -m ldct_jax.main --config=configs/gcn.py:local_blind --workdir=runs/gcn_local_blind
"""
import ml_collections

from ldct_jax.config import base_config

VARIANTS = ("local", "blind")


def get_config(variant: str = ""):
  parts = [p for p in variant.split("_") if p]
  unknown = [p for p in parts if p not in VARIANTS]
  if unknown or len(set(parts)) != len(parts):
    raise ValueError(f"unknown variant {variant!r} of configs/gcn.py (known: local, blind, "
                     "local_blind)")
  config = base_config()
  config.model = ml_collections.ConfigDict(dict(
      name="gcn", features=16, num_blocks=2, k=8, search_window=11, rank=11, search_patch=0))
  config.data.update(dict(patch_size=32, batch_size=16))
  config.optim.update(dict(lr=1e-3, schedule="cosine", end_lr_factor=0.05, grad_clip=1.0))
  config.train.update(dict(num_steps=1000, log_every=50, eval_every=500, checkpoint_every=250))
  if "local" in parts:
    config.model = ml_collections.ConfigDict(dict(name="gcn_local", features=16, num_blocks=2,
                                                  rank=11))
  if "blind" in parts:
    config.data.blind_doses = (0.05, 0.1, 0.25, 0.5)
    config.data.builtin.extra_doses = (0.05, 0.1, 0.5)  # 0.25 is dose_fraction
  return config
