r"""DnCNN (Zhang et al., IEEE TIP 2017): residual noise learner with batch norm, on LDCT.

Default (2-core CPU, built-in data; 8 layers x 32 channels, 64^2 patches, 1500 steps):
  python -m ldct_jax.main --config=configs/dncnn.py --workdir=runs/dncnn
Expected (measured 2026-12-01, held-out test patients SIM007/SIM008, data range 1):
this default is WORSE than its LDCT input: abdomen window [-160, 240] HU
33.56 -> 32.59 dB (SSIM 0.935 -> 0.935), lung [-1350, 150] HU 41.30 -> 39.94 dB
(SSIM 0.943 -> 0.952), RMSE 13.66 -> 15.81 HU. Validation PSNR was still rising
at the last step (28.21 / 29.74 / 30.20 dB at steps 500 / 1000 / 1500): it is
under-trained at this budget; not tuned on the built-in data. 29 min wall clock
(1.13 s/step) on a shared, loaded 2-core machine. README has the table.

Variants: ':paper' (17 layers, 64 channels, 50k steps; needs a GPU),
':dilated' (dilated convolutions). Neither was run.
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
