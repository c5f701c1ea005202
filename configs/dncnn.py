r"""DnCNN (Zhang et al. 2017): 17-layer residual noise learner with batch norm, on LDCT.

Default (2-core CPU, built-in data):
  python -m ldct_jax.main --config=configs/dncnn.py --workdir=runs/dncnn
Variants: ':paper' (17 layers, 64 channels), ':dilated' (dilated convolutions).
"""
from ldct_jax.config import base_config


def get_config(variant: str = ""):
  config = base_config()
  config.model.update(dict(name="dncnn", depth=8, features=32, use_bn=True, dilated=False))
  config.optim.update(dict(lr=1e-3, schedule="cosine", end_lr_factor=0.05, grad_clip=1.0))
  config.train.update(dict(num_steps=1500, eval_every=500, checkpoint_every=500))
  if variant == "paper":
    config.model.update(dict(depth=17, features=64))
    config.data.batch_size = 128
    config.train.update(dict(num_steps=50_000, eval_every=2000, checkpoint_every=2000))
  elif variant == "dilated":
    config.model.dilated = True
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/dncnn.py (known: paper, dilated)")
  return config
