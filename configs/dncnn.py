r"""DnCNN (Zhang et al., IEEE TIP 2017): residual noise learner with batch norm, on LDCT.

Default (2-core CPU, built-in data; 8 layers x 32 channels, 64^2 patches, 1500 steps,
noise head zero-initialised so the untrained net is the identity):
  python -m ldct_jax.main --config=configs/dncnn.py --workdir=runs/dncnn
Expected (measured 2026-12-01, held-out test patients SIM007/SIM008, data range 1):
abdomen window [-160, 240] HU 33.56 -> 36.65 dB (SSIM 0.935 -> 0.956), lung
[-1350, 150] HU 41.30 -> 44.74 dB (SSIM 0.943 -> 0.977), RMSE 13.66 -> 9.20 HU;
11:57 wall clock (0.46 s/step) on 2 cores. With LeCun init of the noise head
(``--config.model.identity_init=False``) the same run ended BELOW its input
(32.59 / 39.94 dB, 15.81 HU; validation still rising). README has the table.

Variants: ':paper' (17 layers, 64 channels, 50k steps; needs a GPU),
':dilated' (dilated convolutions). Neither was run.
"""
from ldct_jax.config import base_config


def get_config(variant: str = ""):
  config = base_config()
  config.model.update(dict(name="dncnn", depth=8, features=32, use_bn=True, dilated=False,
                           identity_init=True))
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
