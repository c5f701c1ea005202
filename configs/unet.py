r"""U-Net with residual output, supervised LDCT -> NDCT.

Default (2-core CPU, built-in data):
  python -m ldct_jax.main --config=configs/unet.py --workdir=runs/unet
Variant ':paper' widens it (32 base channels, depth 4) for GPU training.
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
