"""Flax Linen models, all built on the shared conv layers in ``layers``.

Models are chosen by name from the config (``config.model.name``); the other
fields of ``config.model`` are the module's constructor arguments.
"""
from __future__ import annotations

import importlib

# name -> (module, class). Imported lazily so that importing one model does
# not pay for the others.
MODELS = {
    "redcnn": ("ldct_jax.models.redcnn", "REDCNN"),
    "dncnn": ("ldct_jax.models.dncnn", "DnCNN"),
    "unet": ("ldct_jax.models.unet", "UNet"),
    "gcn": ("ldct_jax.models.gcn", "GCNDenoiser"),
    "gcn_local": ("ldct_jax.models.gcn", "LocalCNN"),
    "noise_vae": ("ldct_jax.models.vae", "NoiseVAE"),
    "cpce2d": ("ldct_jax.models.cpce", "CPCE2D"),
    "cpce3d": ("ldct_jax.models.cpce", "CPCE3D"),
    "deep_cascade": ("ldct_jax.models.cascade", "DeepCascade"),
    "wgan_vgg": ("ldct_jax.models.wgan_vgg", "WGANVGGGenerator"),
    "critic": ("ldct_jax.models.critic", "Critic"),
}


def get_model_class(name: str):
  try:
    module, cls = MODELS[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None
  return getattr(importlib.import_module(module), cls)


def get_model(model_cfg):
  """Instantiates ``config.model``: ``name`` picks the class, the rest are its fields."""
  fields = dict(model_cfg)
  name = fields.pop("name")
  return get_model_class(name)(**fields)
