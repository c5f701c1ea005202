r"""CPCA-k / CPCA_TF-k (Shan et al., IEEE TMI 2018): CPCE-3D on k adjacent slices, WGAN-GP + VGG loss.

The generator reads a slab of k = 3, 5, 7 or 9 adjacent LDCT slices and
denoises the central one; its first (k - 1) / 2 encoder convs are 3x3x3 with
VALID depth padding, the rest is CPCE-2D (models/cpce.py). Everything else as
configs/cpca.py (critic, losses, checkpoint ranking by validation LPIPS).

Variants (tokens joined by '_'):
  :k3 :k5 :k7 :k9   from scratch on k slices (default: k3), configs/cpca.py's rates.
  :k<k>_tf          2D -> 3D transfer, one run: stages generator_mse and
                    generator_2d train CPCE-2D exactly as configs/cpca.py does
                    (on the CPU: MSE warm start, then 1200 adversarial steps),
                    then its generator is inflated to 3D (each 2D
                    kernel H becomes the 3x3x3 kernel [0, H, 0], so the 3D net
                    starts as the trained 2D net on the central slice), the
                    critic carried over, and stage denoiser fine-tunes 3D at lr
                    half the from-scratch rate (the seed's 0.5e-4 against 1e-4;
                    on the CPU 0.5e-5 against 1e-5). From scratch, the 3D
                    generator gets the MSE warm start on the CPU.
  :..._paper        the paper's sizes for a GPU (full-width critic, 64^2 patches,
                    batch 128; 2D for 10 epochs of 128k patches = 10k steps, then
                    10k 3D steps).
Commands (2-core CPU, built-in data; measured at a short budget in README "Texture"):
  python -m ldct_jax.main --config=configs/cpca3d.py:k5 --workdir=runs/cpca5
  python -m ldct_jax.main --config=configs/cpca3d.py:k5_tf --workdir=runs/cpca_tf5
  python -m ldct_jax.main --workdir=runs/cpca_tf5 --mode=denoise --input=<series> --output=<new>
A series with fewer slices than k (down to one) is padded by edge replication
in --mode=denoise, and the log says so. experiments/cpca_transfer.py trains
CPCA-1 once and starts every TF-k run from it (the identical 2D stage).
Seed (Mayo, quarter dose): CPCA_TF-3/5/7 30.00/30.04/30.14 dB, SSIM
0.9031/0.9032/0.9045, perceptual 2.01/1.90/1.87; CPCA-1 29.62 / 0.8976 / 2.37.
"""
import re

import ml_collections

from configs import cpca

SLABS = (3, 5, 7, 9)


def get_config(variant: str = ""):
  tokens = [t for t in (variant or "k3").split("_") if t]
  slabs = [t for t in tokens if re.fullmatch(r"k\d+", t)]
  unknown = [t for t in tokens if t not in slabs and t not in ("tf", "paper")]
  if unknown or len(slabs) != 1 or int(slabs[0][1:]) not in SLABS:
    raise ValueError(f"unknown variant {variant!r} of configs/cpca3d.py: use k3, k5, k7 or k9, "
                     "optionally followed by _tf (2D -> 3D transfer) and/or _paper, e.g. k5_tf")
  k = int(slabs[0][1:])
  config = cpca.get_config("paper" if "paper" in tokens else "")
  config.model = ml_collections.ConfigDict(dict(name="cpce3d", features=config.model.features,
                                                num_layers=config.model.num_layers,
                                                kernel_depth=3))
  config.data.slab = k
  if "tf" in tokens:
    # The 2D stage is configs/cpca.py's run (same steps, same optimiser):
    # its result can be shared (methods.wgan.stage_fingerprint).
    config.wgan.pretrain_2d_steps = config.train.num_steps
    config.wgan.pretrain_optim = ml_collections.ConfigDict(config.optim.to_dict())
    config.optim.lr = 0.5 * config.optim.lr
  return config
