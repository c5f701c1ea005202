r"""U-Net with residual output, supervised LDCT -> NDCT.

Default (2-core CPU, built-in data; 16 base channels, depth 3, 64^2 patches, 1500 steps):
  python -m ldct_jax.main --config=configs/unet.py --workdir=runs/unet
Expected (measured 2026-12-01, held-out test patients SIM007/SIM008, data range 1):
abdomen window [-160, 240] HU 33.56 -> 36.51 dB (SSIM 0.935 -> 0.956), lung
[-1350, 150] HU 41.30 -> 44.87 dB (SSIM 0.943 -> 0.977), RMSE 13.66 -> 9.10 HU,
within 0.2 dB of the default RED-CNN; 6 min wall clock (0.22 s/step, dataset
cached). README has the table.

Variant ':paper' widens it (32 base channels, depth 4, 50k steps) for GPU
training; not run.
"""
from ldct_jax.config import base_config


def get_config(variant: str = ""):
  config = base_config()
  config.model.update(dict(name="unet", features=16, depth=3))
  config.optim.update(dict(lr=1e-3, schedule="cosine", end_lr_factor=0.05, grad_clip=1.0))
  config.train.update(dict(num_steps=1500, eval_every=500, checkpoint_every=500))
  if variant == "paper":
    config.model.update(dict(features=32, depth=4))
    config.data.batch_size = 64
    config.train.update(dict(num_steps=50_000, eval_every=2000, checkpoint_every=2000))
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/unet.py (known: paper)")
  return config
