"""Optimisers and learning-rate schedules from a config block (optax).

Config fields (``config.optim``)::

  name: 'adam' | 'adamw' | 'sgd' | 'rmsprop'
  lr: peak learning rate
  schedule: 'constant' | 'cosine' | 'step' | 'exponential'
  warmup_steps: linear warm-up from 0 to ``lr``
  end_lr_factor: final lr / peak lr for 'cosine'
  decay_every / decay_factor: for 'step' (multiply by factor every N steps) and
      'exponential' (smooth decay with the same half-life semantics)
  grad_clip: global-norm clipping threshold, 0 disables
  weight_decay: decoupled weight decay, used by 'adamw' only
  b1, b2: Adam moments (WGAN-GP uses b1=0.5, b2=0.9)
"""
from __future__ import annotations

import optax


def make_schedule(cfg, num_steps: int) -> optax.Schedule:
  lr = float(cfg.lr)
  warmup = int(cfg.get("warmup_steps", 0))
  kind = cfg.get("schedule", "constant")
  decay_steps = max(1, num_steps - warmup)
  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(cfg.get("end_lr_factor", 0.0)))
  elif kind == "step":
    every = int(cfg.decay_every)
    boundaries = {s: float(cfg.decay_factor) for s in range(every, decay_steps + 1, every)}
    main = optax.piecewise_constant_schedule(lr, boundaries)
  elif kind == "exponential":
    main = optax.exponential_decay(lr, transition_steps=int(cfg.decay_every),
                                   decay_rate=float(cfg.decay_factor))
  else:
    raise ValueError(f"unknown lr schedule {kind!r}: use constant, cosine, step or exponential")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(cfg, num_steps: int) -> optax.GradientTransformation:
  """Builds the optax transformation described by ``cfg`` for a run of ``num_steps``."""
  schedule = make_schedule(cfg, num_steps)
  name = cfg.get("name", "adam")
  b1, b2 = float(cfg.get("b1", 0.9)), float(cfg.get("b2", 0.999))
  if name == "adam":
    opt = optax.adam(schedule, b1=b1, b2=b2)
  elif name == "adamw":
    opt = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=float(cfg.get("weight_decay", 1e-4)))
  elif name == "sgd":
    opt = optax.sgd(schedule, momentum=float(cfg.get("momentum", 0.9)))
  elif name == "rmsprop":
    opt = optax.rmsprop(schedule)
  else:
    raise ValueError(f"unknown optimizer {name!r}: use adam, adamw, sgd or rmsprop")
  clip = float(cfg.get("grad_clip", 0.0))
  if clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(clip), opt)
  return opt
