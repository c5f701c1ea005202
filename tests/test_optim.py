"""Learning-rate schedules and their wiring into the optimiser, against closed forms.

The closed forms below are written from the definitions in
``ldct_jax/train/optim.py``'s docstring (linear warm-up from 0 to ``lr`` over
``warmup_steps``, then the decay counted from the end of warm-up over the
remaining ``num_steps - warmup_steps``), in float64, not from optax.
"""
import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldct_jax.train.optim import make_optimizer, make_schedule

LR, NUM_STEPS, EVERY, FACTOR, END = 3e-3, 24, 5, 0.5, 0.1


def expected_lr(kind: str, t: int, warmup: int) -> float:
  if t < warmup:
    return LR * t / warmup
  u, decay = t - warmup, NUM_STEPS - warmup
  if kind == "constant":
    return LR
  if kind == "cosine":
    return LR * (END + (1 - END) * 0.5 * (1 + math.cos(math.pi * min(u, decay) / decay)))
  if kind == "step":
    return LR * FACTOR ** (u // EVERY)
  if kind == "exponential":
    return LR * FACTOR ** (u / EVERY)
  raise AssertionError(kind)


def config(kind: str, warmup: int, **extra) -> ml_collections.ConfigDict:
  fields = dict(name="adam", lr=LR, schedule=kind, warmup_steps=warmup, end_lr_factor=END,
                decay_every=EVERY, decay_factor=FACTOR)
  return ml_collections.ConfigDict({**fields, **extra})


@pytest.mark.parametrize("warmup", [0, 4])
@pytest.mark.parametrize("kind", ["constant", "cosine", "step", "exponential"])
def test_schedule_matches_closed_form(kind, warmup):
  schedule = make_schedule(config(kind, warmup), NUM_STEPS)
  # Every step, so warm-up ends, decay boundaries (t - warmup = 5, 10, ...) and
  # the final steps are all covered.
  steps = np.arange(NUM_STEPS + 1)
  got = np.array([float(schedule(int(t))) for t in steps])
  want = np.array([expected_lr(kind, int(t), warmup) for t in steps])
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)
  # Spot values that pin the conventions, independent of the helper above.
  if warmup:
    assert got[0] == 0.0 and got[warmup] == pytest.approx(LR, rel=1e-6)
    assert got[1] == pytest.approx(LR / warmup, rel=1e-6)
  if kind == "cosine":
    assert got[NUM_STEPS] == pytest.approx(END * LR, rel=1e-6)
  if kind == "step":
    assert got[warmup + EVERY - 1] == pytest.approx(LR, rel=1e-6)
    assert got[warmup + EVERY] == pytest.approx(FACTOR * LR, rel=1e-6)
  if kind == "exponential":
    assert got[warmup + 2 * EVERY] == pytest.approx(FACTOR ** 2 * LR, rel=1e-6)


@pytest.mark.parametrize("kind,warmup", [("cosine", 4), ("step", 0)])
def test_optimizer_applies_the_schedule_each_step(kind, warmup):
  # Plain SGD (no momentum): update_t = -lr_t * g, so the updates read back the schedule.
  tx = make_optimizer(config(kind, warmup, name="sgd", momentum=0.0), NUM_STEPS)
  params = {"w": jnp.zeros(3)}
  grad = {"w": jnp.array([1.0, -2.0, 0.5])}
  state = tx.init(params)
  for t in range(NUM_STEPS):
    updates, state = tx.update(grad, state, params)
    np.testing.assert_allclose(np.asarray(updates["w"]),
                               -expected_lr(kind, t, warmup) * np.array([1.0, -2.0, 0.5]),
                               rtol=2e-6, atol=1e-12)


def test_grad_clip_scales_to_the_global_norm():
  tx = make_optimizer(config("constant", 0, name="sgd", momentum=0.0, grad_clip=1.0),
                      NUM_STEPS)
  params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
  grad = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}  # global norm 5
  updates, _ = tx.update(grad, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["a"]), [-LR * 3 / 5, 0.0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(updates["b"]), [-LR * 4 / 5], rtol=1e-6)


def test_unknown_names_are_rejected():
  with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
    make_schedule(config("linear", 0), NUM_STEPS)
  with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
    make_optimizer(config("constant", 0, name="lamb"), NUM_STEPS)
