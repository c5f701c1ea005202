"""WGAN-GP: the gradient penalty against finite differences, the critic/generator alternation.

Tiny networks and images (compilation dominates the run time). The penalty
is checked in float64 against central differences of the critic's output,
written out here, and its parameter gradient (a double backprop through the
project's custom-VJP convolutions) against central differences of the
penalty itself.
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest


from configs import cpca as cpca_config
from configs import cpca3d as cpca3d_config
from configs import wgan_vgg as wgan_vgg_config
from ldct_jax.config import base_config
from ldct_jax.data.pipeline import Normalization
from ldct_jax.errors import InputError
from ldct_jax.methods import build_method, wgan
from ldct_jax.models.critic import Critic
from ldct_jax.models.dncnn import DnCNN
from ldct_jax.workdir import state_signature


def _tiny_critic_setup(seed=0):
  critic = Critic(features=(2, 3, 3), strides=(1, 2, 2), dense=5)
  rng = np.random.default_rng(seed)
  real = rng.uniform(0.0, 1.0, (3, 6, 6, 1))
  fake = rng.uniform(0.0, 1.0, (3, 6, 6, 1))
  params = critic.init(jax.random.PRNGKey(seed), jnp.zeros((1, 6, 6, 1)))["params"]
  return critic, real, fake, params


def _fd_input_gradients(score, x, h=1e-5):
  """Central differences of each sample's score w.r.t. each of its pixels (NumPy loop)."""
  grads = np.zeros_like(x)
  for index in np.ndindex(x.shape[1:]):
    up, down = x.copy(), x.copy()
    up[(slice(None),) + index] += h
    down[(slice(None),) + index] -= h
    grads[(slice(None),) + index] = (np.asarray(score(up)) - np.asarray(score(down))) / (2 * h)
  return grads


def test_gradient_penalty_equals_finite_differences_of_the_critic():
  critic, real, fake, params = _tiny_critic_setup()
  eps = np.array([0.1, 0.5, 0.8])
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    score = jax.jit(lambda x: critic.apply({"params": params64}, jnp.asarray(x)))
    penalty, norms = wgan.gradient_penalty(score, jnp.asarray(real), jnp.asarray(fake),
                                           jnp.asarray(eps))
    x_hat = eps[:, None, None, None] * real + (1.0 - eps[:, None, None, None]) * fake
    grads = _fd_input_gradients(score, x_hat)
  expected_norms = np.sqrt(np.sum(grads ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(np.asarray(norms), expected_norms, rtol=1e-6)
  np.testing.assert_allclose(float(penalty), np.mean((expected_norms - 1.0) ** 2), rtol=1e-6)
  assert float(penalty) > 0.1  # a random critic is far from 1-Lipschitz: the check is not vacuous


def test_gradient_penalty_parameter_gradient_equals_finite_differences():
  """d penalty / d theta (double backprop) against central differences of the penalty."""
  critic, real, fake, params = _tiny_critic_setup(1)
  eps = jnp.asarray([0.3, 0.6, 0.9])
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    flat, unravel = jax.flatten_util.ravel_pytree(params64)

    def penalty(theta):
      score = lambda x: critic.apply({"params": unravel(theta)}, x)
      return wgan.gradient_penalty(score, jnp.asarray(real), jnp.asarray(fake), eps)[0]

    grad = np.asarray(jax.jit(jax.grad(penalty))(flat))
    value = jax.jit(penalty)
    h = 1e-5
    # Entries in every layer: first/last conv kernels and both dense layers.
    for i in np.linspace(0, flat.size - 1, 12).round().astype(int):
      step = jnp.zeros_like(flat).at[i].set(h)
      numeric = (float(value(flat + step)) - float(value(flat - step))) / (2 * h)
      assert grad[i] == pytest.approx(numeric, rel=1e-5, abs=1e-9), i


def test_interpolates_use_one_eps_per_sample():
  real, fake = jnp.ones((2, 3, 3, 1)), jnp.zeros((2, 3, 3, 1))
  x = wgan.interpolate(real, fake, jnp.asarray([0.25, 0.75]))
  np.testing.assert_allclose(np.asarray(x)[:, :, :, 0], [np.full((3, 3), 0.25),
                                                         np.full((3, 3), 0.75)])
  eps = np.asarray(wgan.draw_eps(jax.random.PRNGKey(0), 4096))
  assert eps.min() >= 0 and eps.max() <= 1 and abs(eps.mean() - 0.5) < 0.02


def test_split_batch_interleaves_sub_batches():
  batch = {"ld": jnp.arange(12.0).reshape(12, 1)}
  parts = np.asarray(wgan.split_batch(batch, 3)["ld"])[..., 0]
  np.testing.assert_array_equal(parts, [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
  with pytest.raises(ValueError, match="sub-batches"):
    wgan.split_batch({"ld": jnp.zeros((10, 1))}, 3)


# ------------------------------------------------------------ the alternation


N_CRITIC = 3


@pytest.fixture(scope="module")
def alternation():
  """A DnCNN generator with batch norm (its statistics must freeze too), a
  tiny critic, the shipped VGG at conv1_2; random 8x8 patches."""
  generator = DnCNN(depth=3, features=4, use_bn=True)
  critic = Critic(features=(2, 2), strides=(1, 2), dense=4)
  normalization = Normalization()
  perceptual, feature_arrays = wgan._load_perceptual("lpips_vgg16", "conv1_2", -300.0, 300.0,
                                                     normalization)
  config = base_config()
  gen_tx = wgan.make_optimizer(config.optim, 10)
  critic_tx = wgan.make_optimizer(wgan.default_config().critic_optim, 10)
  key = jax.random.PRNGKey(0)
  gen_state = wgan.supervised.create_train_state(generator, gen_tx, key, (1, 8, 8, 1))
  critic_params = critic.init(key, jnp.zeros((1, 8, 8, 1)))["params"]
  state = wgan.WGANState(
      generator=gen_state,
      critic=wgan.train_state.TrainState.create(apply_fn=critic.apply, params=critic_params,
                                                tx=critic_tx),
      features=jax.tree.map(jnp.asarray, feature_arrays))
  critic_update = wgan.make_critic_update(generator, critic, gp_weight=10.0)
  generator_update = wgan.make_generator_update(generator, critic, perceptual,
                                                perceptual_weight=0.1, pixel_weight=0.5,
                                                pixel_loss=wgan.losses.l2_loss)
  phases = wgan.make_phases(critic_update, generator_update, N_CRITIC)
  step = wgan.make_train_step(critic_update, generator_update, N_CRITIC)
  rng = np.random.default_rng(0)
  batch = {k: jnp.asarray(rng.uniform(0.2, 0.4, (2 * (N_CRITIC + 1), 8, 8, 1)), jnp.float32)
           for k in ("ld", "nd")}
  return dict(state=state, phases=phases, step=step, critic_update=critic_update, batch=batch)


def _same(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(leaves_a) == len(leaves_b) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


def test_each_phase_updates_one_network_and_leaves_the_other_frozen(alternation):
  critic_phase, generator_phase = (jax.jit(p) for p in alternation["phases"])
  s0 = alternation["state"]
  parts = wgan.split_batch(alternation["batch"], N_CRITIC + 1)
  s1, metrics = critic_phase(s0, parts, jax.random.PRNGKey(1))
  # Critic phase: n_critic updates of the critic; the generator (params,
  # Adam moments, batch-norm statistics, step) and the VGG untouched.
  assert int(s1.critic.step) == N_CRITIC and int(s1.generator.step) == 0
  assert _same(s1.generator, s0.generator) and _same(s1.features, s0.features)
  assert not _same(s1.critic.params, s0.critic.params)
  assert {"critic/gp", "critic/wasserstein"} <= set(metrics)
  s2, metrics = generator_phase(s1, parts, jax.random.PRNGKey(2))
  # Generator phase: one generator update (batch statistics move), critic frozen.
  assert int(s2.generator.step) == 1 and int(s2.critic.step) == N_CRITIC
  assert _same(s2.critic, s1.critic) and _same(s2.features, s1.features)
  assert not _same(s2.generator.params, s1.generator.params)
  assert not _same(s2.generator.batch_stats, s1.generator.batch_stats)
  assert {"gen/adversarial", "gen/perceptual", "gen/pixel"} <= set(metrics)


def test_critic_phase_is_n_critic_single_updates_on_successive_sub_batches(alternation):
  """The scanned critic phase equals n_critic updates applied one by one, update i
  on sub-batch i with the i-th key; the generator's sub-batch is never used."""
  critic_phase, _ = alternation["phases"]
  s0 = alternation["state"]
  parts = wgan.split_batch(alternation["batch"], N_CRITIC + 1)
  rng = jax.random.PRNGKey(3)
  scanned, _ = jax.jit(critic_phase)(s0, parts, rng)
  update = jax.jit(alternation["critic_update"])
  critic = s0.critic
  for i, key in enumerate(jax.random.split(rng, N_CRITIC)):
    critic, _ = update(s0.generator, critic, parts["ld"][i], parts["nd"][i], key)
  for a, b in zip(jax.tree.leaves(scanned.critic), jax.tree.leaves(critic)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
  # Changing the generator's sub-batch does not change the critic phase.
  other = dict(parts, ld=parts["ld"].at[N_CRITIC].add(0.1))
  again, _ = jax.jit(critic_phase)(s0, other, rng)
  assert _same(again.critic, scanned.critic)


def test_train_steps_alternate_n_critic_to_one(alternation):
  """A step is the critic phase then the generator phase, exactly; after three
  steps the critic made 3 * n_critic updates and the generator 3."""
  step = jax.jit(alternation["step"])
  critic_phase, generator_phase = alternation["phases"]
  s0, batch, rng = alternation["state"], alternation["batch"], jax.random.PRNGKey(4)
  s1, metrics = step(s0, batch, rng)
  parts = wgan.split_batch(batch, N_CRITIC + 1)
  critic_rng, gen_rng = jax.random.split(rng)
  by_hand, _ = jax.jit(lambda s: generator_phase(critic_phase(s, parts, critic_rng)[0],
                                                 parts, gen_rng))(s0)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(by_hand)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
  state = s1
  for i in range(2):
    state, metrics = step(state, batch, jax.random.PRNGKey(5 + i))
  assert int(state.critic.step) == 3 * N_CRITIC and int(state.generator.step) == 3
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert _same(state.features, s0.features)


# ------------------------------------------------------------------- configs


@pytest.mark.parametrize("path,variant", [
    ("wgan_vgg", ""), ("wgan_vgg", "paper"), ("cpca", ""), ("cpca", "paper"),
    ("cpca3d", "k3"), ("cpca3d", "k9"), ("cpca3d", "k7_tf"), ("cpca3d", "k5_tf_paper")])
def test_configs_build_and_trace(path, variant):
  module = {"wgan_vgg": wgan_vgg_config, "cpca": cpca_config, "cpca3d": cpca3d_config}[path]
  config = module.get_config(variant)
  method = build_method(config, None)
  signature = state_signature(config)
  assert config.train.best_metric == "val/lpips" and config.train.best_mode == "min"
  names = [stage.name for stage in method.stages]
  # CPU defaults warm the (first) generator up on MSE; the papers' sizes do not.
  if "paper" in variant:
    assert config.wgan.warmup_steps == 0
  else:
    assert config.wgan.warmup_steps > 0 and names[0] == wgan.WARMUP_STAGE
    names = names[1:]
  if variant.endswith("tf") or "_tf_" in variant:
    assert names == [wgan.PRETRAIN_STAGE, wgan.DENOISER_STAGE]
    k = config.data.slab
    # The inflated 3D conv1 kernel: depth 3 in front of the 2D one's shape.
    leaf = ".generator.params['conv1']['kernel']"
    (_, shape_2d, _), = [e for e in signature[wgan.PRETRAIN_STAGE] if e[0] == leaf]
    (_, shape_3d, _), = [e for e in signature[wgan.DENOISER_STAGE] if e[0] == leaf]
    assert shape_3d == (3,) + shape_2d and method.input_slab == k
    assert config.optim.lr == 0.5 * config.wgan.pretrain_optim.lr
  else:
    assert names == [wgan.DENOISER_STAGE]


def test_transfer_stage_is_the_cpca_run():
  """The 2D stage of every TF-k run has the fingerprint of configs/cpca.py's run."""
  cpca = wgan.stage_fingerprint(cpca_config.get_config())
  for k in (3, 5, 7, 9):
    tf = cpca3d_config.get_config(f"k{k}_tf")
    assert wgan.stage_fingerprint(wgan.pretrain_config(tf)) == cpca
  other = cpca_config.get_config()
  other.wgan.n_critic = 5
  assert wgan.stage_fingerprint(other) != cpca
  with pytest.raises(ValueError, match="single-stage"):
    wgan.stage_fingerprint(cpca3d_config.get_config("k3_tf"))


def test_adversarial_stage_starts_from_the_warmed_up_generator():
  """After the MSE warm-up the adversarial stage starts with exactly the warmed-up
  generator (weights; fresh optimiser) and a fresh critic, the one a run without
  warm-up would start with from the same key."""
  config = cpca_config.get_config()
  config.model.update(dict(features=4, num_layers=2))
  config.wgan.critic.update(dict(features=(2, 2, 4, 4, 8, 8), dense=8))
  config.wgan.update(dict(warmup_steps=3, val_lpips=False))
  config.wgan.perceptual.layer = "conv1_2"
  config.data.update(dict(patch_size=16, batch_size=2))
  warm, adversarial = build_method(config, None).stages
  assert (warm.name, adversarial.name, warm.num_steps) == (wgan.WARMUP_STAGE,
                                                           wgan.DENOISER_STAGE, 3)
  assert warm.eval_every == 3 and adversarial.eval_every is None
  rng = np.random.default_rng(0)
  batch = {k: rng.uniform(0.2, 0.4, (2, 16, 16, 1)).astype(np.float32) for k in ("ld", "nd")}
  state = warm.init_state(jax.random.PRNGKey(0), {})
  before = state.params
  for i in range(3):
    state, metrics = jax.jit(warm.train_step)(state, batch, jax.random.PRNGKey(i))
  assert set(metrics) >= {"loss", "mse"} and "critic/loss" not in metrics
  assert not _same(before, state.params)  # it trained
  key = jax.random.PRNGKey(7)
  start = adversarial.init_state(key, {wgan.WARMUP_STAGE: state})
  assert _same(start.generator.params, state.params) and int(start.generator.step) == 0
  config.wgan.warmup_steps = 0
  (cold,) = build_method(config, None).stages
  assert _same(start.critic.params, cold.init_state(key, {}).critic.params)


def test_bad_configs_fail_clearly():
  with pytest.raises(ValueError, match="k3, k5, k7 or k9"):
    cpca3d_config.get_config("k4")
  config = cpca_config.get_config()
  config.wgan.pretrain_2d_steps = 10
  with pytest.raises(InputError, match="cpce3d"):
    build_method(config, None)
  config = cpca_config.get_config()
  config.wgan.perceptual.weights = ""
  with pytest.raises(InputError, match="wgan.perceptual.weights"):
    build_method(config, None)
  config = base_config()
  config.method = "wgan"
  with pytest.raises(InputError, match="config.wgan"):
    build_method(config, None)


# ------------------------------------------------------------------ sharding


SHARDED = textwrap.dedent(r"""
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from ldct_jax.config import base_config
    from ldct_jax.data.pipeline import to_global_batch
    from ldct_jax.methods import build_method, wgan

    assert jax.device_count() == 2, jax.devices()
    config = base_config()
    config.method = "wgan"
    config.wgan = wgan.default_config()
    config.model.update(dict(name="cpce2d", features=4, num_layers=2))
    config.wgan.update(dict(n_critic=2, val_lpips=False, pixel_weight=0.5))
    config.wgan.critic.update(dict(features=(2, 2, 4, 4), strides=(1, 2, 1, 2), dense=4))
    config.wgan.perceptual.layer = "conv1_2"
    config.data.update(dict(patch_size=16, batch_size=4))
    stage = build_method(config, None).stages[0]
    rng = np.random.default_rng(0)
    batches = [{k: rng.uniform(0.2, 0.4, (12, 16, 16, 1)).astype(np.float32) for k in ("ld", "nd")}
               for _ in range(2)]

    def train(devices):
      mesh = Mesh(np.array(devices), ("data",))
      repl = NamedSharding(mesh, P())
      state = jax.jit(stage.init_state, out_shardings=repl)(jax.random.PRNGKey(0), {})
      step = jax.jit(stage.train_step, donate_argnums=(0,), out_shardings=(repl, repl))
      losses = []
      for i, b in enumerate(batches):
        state, m = step(state, to_global_batch(b, mesh), jax.random.PRNGKey(i))
        losses.append([float(m["loss"]), float(m["critic/loss"])])
      return losses, jax.device_get((state.generator.params, state.critic.params))

    l1, p1 = train(jax.devices()[:1])
    l2, p2 = train(jax.devices())
    np.testing.assert_allclose(l1, l2, rtol=1e-4, atol=1e-6)
    # Adam divides by the root mean square of the gradient: where a gradient is
    # near zero, the reduction-order differences of the sharded sums move a
    # parameter by a fraction of the learning rate (1e-4), hence atol 2e-5.
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5)
    print("OK", l1)
""")


def test_two_device_wgan_step_matches_one_device():
  """The loop's data parallelism (batch sharded, state replicated) leaves the WGAN
  step's result unchanged: sub-batches, penalty and both updates included."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "OK" in result.stdout
