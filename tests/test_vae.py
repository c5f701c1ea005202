"""Tests for ldct_jax.models.vae: noise extraction, ELBO training, sampling."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ldct_jax import metrics
from ldct_jax import noise_stats as ns
from ldct_jax.data import phantoms
from ldct_jax.data.pipeline import Normalization
from ldct_jax.models import vae
from ldct_jax.physics import ct

NORM = Normalization()  # the default: (HU + 1024) / 4096
TINY = dict(normalization=NORM, latent_channels=4, features=8, num_down=1)


def _corr(a, b, mask):
  a, b = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
  return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _correlated_noise(key, shape, std_hu=16.0):
  """Spatially correlated noise (white noise blurred, sigma 1 px), network units."""
  white = jax.random.normal(key, shape)
  blurred = metrics.gaussian_blur(white, 1.0)
  return blurred / jnp.std(blurred) * std_hu / NORM.scale


def test_extract_noise_keeps_noise_and_leaves_edges():
  volume = phantoms.make_volume(5, region="abdomen", size=64, num_slices=2)
  px = float(volume.pixel_spacing_mm)
  hu = jnp.asarray(volume.hu)
  geometry = ct.ParallelBeamGeometry.for_image((64, 64), px)
  # True noise against the noise-free FBP: the phantom itself differs from
  # any FBP by the reconstruction blur of its edges.
  clean = ct.mu_to_hu(geometry.reconstruct(geometry.project(ct.hu_to_mu(hu), px), (64, 64), px))
  low = ct.simulate_low_dose(hu, 0.25, jax.random.PRNGKey(0), incident_flux=1e5, pixel_size=px)
  ld_norm = NORM.normalize(low)[..., None]
  noise, structure = vae.extract_noise(ld_norm, normalization=NORM)
  np.testing.assert_allclose(noise + structure, ld_norm, atol=1e-6)
  noise_hu = np.asarray(noise)[..., 0] * NORM.scale
  true = np.asarray(low - clean)
  edges = np.asarray(clean - metrics.gaussian_blur(clean[..., None], 1.0)[..., 0])
  body = np.asarray(volume.hu) > -900
  assert _corr(noise_hu, true, body) > 0.6
  assert abs(_corr(noise_hu, edges, body)) < 0.15
  # The test can fail: a linear low-pass residual is mostly edges.
  linear = np.asarray(ld_norm - metrics.gaussian_blur(ld_norm, 1.5))[..., 0]
  assert _corr(linear, edges, body) > 0.5


def test_estimate_noise_std_recovers_white_noise_in_body():
  key = jax.random.PRNGKey(1)
  image = jnp.full((2, 32, 32, 1), 0.25).at[:, :, :8].set(0.0)  # air strip
  image = image + (10.0 / NORM.scale) * jax.random.normal(key, image.shape) * (image > 0)
  estimate = np.asarray(vae.estimate_noise_std(image, NORM)).ravel() * NORM.scale
  np.testing.assert_allclose(estimate, 10.0, rtol=0.15)


def test_kl_weight_schedule():
  assert float(vae.kl_weight_schedule(0, 10, 0.5)) == 0.0
  assert float(vae.kl_weight_schedule(5, 10, 0.5)) == pytest.approx(0.25)
  assert float(vae.kl_weight_schedule(10, 10, 0.5)) == pytest.approx(0.5)
  assert float(vae.kl_weight_schedule(1000, 10, 0.5)) == pytest.approx(0.5)
  assert float(vae.kl_weight_schedule(3, 0, 0.7)) == pytest.approx(0.7)
  jitted = jax.jit(vae.kl_weight_schedule, static_argnums=(1, 2))
  assert float(jitted(jnp.asarray(2), 4, 1.0)) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def trained():
  """A tiny VAE after 200 Adam steps on correlated noise patches (16x16)."""
  keys = jax.random.split(jax.random.PRNGKey(2), 3)
  noise = _correlated_noise(keys[0], (8, 16, 16, 1))
  condition = 0.25 + 0.02 * jax.random.uniform(keys[1], (8, 1, 1, 1)) * jnp.ones_like(noise)
  batch = {"noise": noise, "condition": condition}
  model = vae.NoiseVAE(**TINY)
  params = model.init(keys[2], noise, condition, keys[2], train=True)
  optimizer = optax.adam(1e-2)
  loss_fn = functools.partial(vae.elbo_loss, model=model)

  @jax.jit
  def step(params, opt_state, key, kl_weight):
    (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key, kl_weight)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, m

  opt_state = optimizer.init(params)
  eval_key = jax.random.PRNGKey(99)
  first = loss_fn(params, batch, eval_key, 1.0)[0]
  for i in range(200):
    params, opt_state, _ = step(params, opt_state, jax.random.PRNGKey(i),
                                vae.kl_weight_schedule(i, 10, 1.0))
  last, metrics_ = loss_fn(params, batch, eval_key, 1.0)
  return model, params, batch, float(first), float(last), metrics_


def test_elbo_decreases(trained):
  _, _, _, first, last, m = trained
  assert np.isfinite(last)
  assert last < first - 0.5  # nats per pixel
  assert float(m["sigma_hu"]) < 100.0  # the likelihood scale stays sane


def test_shapes_and_reconstruction(trained):
  model, params, batch, *_ = trained
  recon, mean, logvar = model.apply(params, batch["noise"], batch["condition"],
                                    jax.random.PRNGKey(0), train=True)
  assert recon.shape == batch["noise"].shape
  assert mean.shape == logvar.shape == (8, 8, 8, TINY["latent_channels"])
  with pytest.raises(ValueError):
    model.apply(params, batch["noise"][:, :15], batch["condition"][:, :15],
                method=vae.NoiseVAE.encode)


def test_samples_depend_on_key_and_have_data_std(trained):
  model, params, batch, *_ = trained
  condition = batch["condition"][:2, :15, :13]  # odd size: padded inside
  sample = functools.partial(model.apply, params, method=vae.NoiseVAE.sample)
  a = sample(condition, jax.random.PRNGKey(5))
  b = sample(condition, jax.random.PRNGKey(5))
  c = sample(condition, jax.random.PRNGKey(6))
  assert a.shape == condition.shape
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  draws = jnp.stack([sample(batch["condition"], jax.random.PRNGKey(k)) for k in range(16)])
  per_pixel_std = float(jnp.mean(jnp.std(draws, axis=0)))
  data_std = float(jnp.std(batch["noise"]))
  # Not a deterministic blur of the condition: samples vary as the data do.
  assert 0.5 * data_std < per_pixel_std < 2.0 * data_std
  zero_temp = sample(batch["condition"], jax.random.PRNGKey(7), 0.0)
  assert float(jnp.std(zero_temp)) < 0.5 * data_std


def test_synthesize_adds_noise_to_ndct(trained):
  model, params, batch, *_ = trained
  ndct = batch["condition"]
  pseudo = jax.jit(functools.partial(vae.synthesize, model=model))(
      params, ndct, jax.random.PRNGKey(8))
  assert pseudo.shape == ndct.shape
  added = np.asarray(pseudo - ndct)
  assert 0.3 * float(jnp.std(batch["noise"])) < added.std() < 3.0 * float(jnp.std(batch["noise"]))


def _radial_nps(noise_norm):
  """Radial NPS (4 bins, unit pixels) of (B, 16, 16, 1) noise, in HU^2."""
  return ns.radial_noise_nps(np.asarray(noise_norm)[..., 0] * NORM.scale, 1.0, None, roi=16,
                             num_bins=4)[1]


def test_samples_have_the_training_noise_spectrum(trained):
  # The collapse this guards against: all variance in a white residual,
  # samples white noise. Trained on blurred (low-pass) noise, the samples'
  # NPS shape must be closer to the data's than white noise of the data's
  # variance. Shapes (NPS / its sum): the level is the business of
  # test_samples_depend_on_key_and_have_data_std, and after 200 steps the
  # samples are still ~0.6x the data's std.
  model, params, batch, *_ = trained
  condition = jnp.tile(batch["condition"], (4, 1, 1, 1))
  samples = model.apply(params, condition, jax.random.PRNGKey(11), method=vae.NoiseVAE.sample)
  data = _correlated_noise(jax.random.PRNGKey(12), samples.shape)
  white = jnp.std(data) * jax.random.normal(jax.random.PRNGKey(13), samples.shape)
  shape = lambda noise: _radial_nps(noise) / _radial_nps(noise).sum()
  distance = lambda noise: np.linalg.norm(shape(noise) - shape(data)) / np.linalg.norm(shape(data))
  assert distance(samples) < 0.5 * distance(white)
  # Power where the blur passes it, little near Nyquist, as in the data.
  nps = _radial_nps(samples)
  assert nps[0] > 5.0 * nps[-1]


def test_fixed_sigma_is_absolute_and_learned_sigma_is_a_parameter():
  key = jax.random.PRNGKey(3)
  z = jax.random.normal(key, (2, 8, 8, 4))
  condition = jnp.concatenate([jnp.full((1, 16, 16, 1), 0.0), jnp.full((1, 16, 16, 1), 0.4)])
  fixed = vae.NoiseVAE(**TINY, fixed_sigma=0.2)
  params = fixed.init(key, z, condition, method=vae.NoiseVAE.likelihood)
  assert "log_sigma" not in params["params"]
  # Shift s(c) far from 1: the residual std must not follow it (a residual
  # in units of the learnt s(c) let the model move the noise back into it).
  inner = params["params"]
  params = {"params": {**inner, "cond_log_scale": {**inner["cond_log_scale"],
                                                   "bias": jnp.full((1,), 2.0)}}}
  _, log_std = fixed.apply(params, z, condition, method=vae.NoiseVAE.likelihood)
  np.testing.assert_allclose(np.exp(np.asarray(log_std)), 0.2 * fixed.noise_scale, rtol=1e-5)
  learned = vae.NoiseVAE(**TINY, sigma_mode="learned")
  params = learned.init(key, z, condition, method=vae.NoiseVAE.likelihood)
  assert params["params"]["log_sigma"].shape == ()
  with pytest.raises(ValueError):
    vae.NoiseVAE(**TINY, sigma_mode="white").init(key, z, condition,
                                                   method=vae.NoiseVAE.likelihood)


def test_linear_decoder_is_linear_in_z():
  # Linear in z for a fixed condition makes p(noise | c) exactly Gaussian
  # with covariance A(c) A(c)^T + sigma^2 I: prior samples carry the
  # covariance the ELBO fitted, with no "holes" between posterior codes.
  keys = jax.random.split(jax.random.PRNGKey(4), 3)
  z1, z2 = (jax.random.normal(k, (1, 8, 8, 4)) for k in keys[:2])
  condition = 0.25 + 0.05 * jax.random.normal(keys[2], (1, 16, 16, 1))
  for linear in (True, False):
    model = vae.NoiseVAE(**TINY, linear_decoder=linear)
    params = model.init(keys[0], z1, condition, method=vae.NoiseVAE.decode)
    decode = functools.partial(model.apply, params, condition=condition,
                               method=vae.NoiseVAE.decode)
    combined = decode(2.0 * z1 - 0.5 * z2)
    superposed = 2.0 * decode(z1) - 0.5 * decode(z2)
    error = float(jnp.max(jnp.abs(combined - superposed)) / jnp.max(jnp.abs(combined)))
    assert (error < 1e-4) == linear


def test_noise_map_sets_the_level_from_physics_at_init():
  # noise_map_weight starts at 1: a map 0.5 higher (log std) must give
  # samples e^0.5 = 1.65x stronger before any training, for the same
  # structure; the local scale network starts at zero.
  model = vae.NoiseVAE(normalization=NORM, latent_channels=2, features=4, num_down=0,
                       use_noise_map=True)
  structure = jnp.full((4, 16, 16, 1), 0.25)
  low = vae.make_condition(structure, jnp.full_like(structure, 2.0))
  high = vae.make_condition(structure, jnp.full_like(structure, 2.5))
  params = model.init(jax.random.PRNGKey(0), structure, low, jax.random.PRNGKey(1), train=True)
  draw = lambda c: model.apply(params, c, jax.random.PRNGKey(2), 1.0, method=vae.NoiseVAE.sample)
  ratio = float(jnp.std(draw(high)) / jnp.std(draw(low)))
  # The fixed white residual does not scale, so the ratio is a bit below e^0.5.
  assert 1.3 < ratio <= np.exp(0.5) + 1e-3
  with pytest.raises(ValueError, match="noise_map"):
    vae.synthesize(params, structure, jax.random.PRNGKey(3), model=model)
  with pytest.raises(ValueError, match=r"\(batch, height, width, 2\)"):
    model.apply(params, structure, jax.random.PRNGKey(2), method=vae.NoiseVAE.sample)
  pseudo = vae.synthesize(params, structure, jax.random.PRNGKey(3), model=model,
                          noise_map=jnp.full_like(structure, 2.0))
  assert pseudo.shape == structure.shape


def test_level_from_map_ignores_structure_and_follows_the_map_exactly():
  # level_from_map: log s = log noise_scale + b + (map - 2.5). The FiLM
  # starts as the identity, so at init the decoder mean for a fixed z scales
  # by exactly e^0.5 when the map rises by 0.5, and a different structure
  # (bone vs water) does not change it; the learnt offset b moves every
  # pixel alike.
  model = vae.NoiseVAE(normalization=NORM, latent_channels=2, features=4, num_down=0,
                       use_noise_map=True, level_from_map=True)
  z = jax.random.normal(jax.random.PRNGKey(5), (2, 16, 16, 2))
  water = jnp.full((2, 16, 16, 1), 0.25)
  bone = jnp.full_like(water, 0.5)
  condition = lambda s, m: vae.make_condition(s, jnp.full_like(s, m))
  params = model.init(jax.random.PRNGKey(0), z, condition(water, 2.0), method=vae.NoiseVAE.decode)
  assert "cond_log_scale" not in params["params"] and "noise_map_weight" not in params["params"]
  decode = lambda p, c: model.apply(p, z, c, method=vae.NoiseVAE.decode)
  base = decode(params, condition(water, 2.0))
  np.testing.assert_allclose(decode(params, condition(water, 2.5)), np.exp(0.5) * base,
                             rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(decode(params, condition(bone, 2.0)), base, rtol=1e-5, atol=1e-9)
  shifted = jax.tree_util.tree_map(lambda x: x, params)
  shifted["params"]["level_offset"] = jnp.asarray(0.3)
  np.testing.assert_allclose(decode(shifted, condition(water, 2.0)), np.exp(0.3) * base,
                             rtol=1e-5, atol=1e-9)
  with pytest.raises(ValueError, match="use_noise_map"):
    vae.NoiseVAE(normalization=NORM, latent_channels=2, features=4, level_from_map=True).init(
        jax.random.PRNGKey(0), z, water, method=vae.NoiseVAE.decode)


def test_structure_film_off_makes_the_model_blind_to_local_hu():
  # With a trained (non-zero) FiLM the decoder's output depends on the
  # structure channel; with structure_film=False it must not, while the map
  # still modulates it.
  z = jax.random.normal(jax.random.PRNGKey(6), (1, 16, 16, 2))
  water = jnp.full((1, 16, 16, 1), 0.25)
  bone = water.at[:, :, 8:].set(0.5)
  condition = lambda s, m: vae.make_condition(s, jnp.full_like(s, m))
  outputs = {}
  for structure_film in (True, False):
    model = vae.NoiseVAE(normalization=NORM, latent_channels=2, features=4, num_down=0,
                         use_noise_map=True, level_from_map=True,
                         structure_film=structure_film)
    params = model.init(jax.random.PRNGKey(0), z, condition(water, 2.5),
                        method=vae.NoiseVAE.decode)
    film = params["params"]["cond_film"]["kernel"]
    params["params"]["cond_film"]["kernel"] = 0.5 * jax.random.normal(jax.random.PRNGKey(8),
                                                                     film.shape)
    decode = lambda c: model.apply(params, z, c, method=vae.NoiseVAE.decode)
    outputs[structure_film] = [decode(condition(water, 2.5)), decode(condition(bone, 2.5)),
                               decode(condition(water, 2.0))]
  water_on, bone_on, _ = outputs[True]
  water_off, bone_off, low_map_off = outputs[False]
  assert float(jnp.max(jnp.abs(bone_on - water_on))) > 1e-3 * float(jnp.max(jnp.abs(water_on)))
  np.testing.assert_allclose(bone_off, water_off, rtol=1e-6, atol=1e-9)
  assert float(jnp.max(jnp.abs(low_map_off - water_off))) > 1e-3 * float(
      jnp.max(jnp.abs(water_off)))
  with pytest.raises(ValueError, match="structure_film"):
    vae.NoiseVAE(normalization=NORM, latent_channels=2, features=4, structure_film=False).init(
        jax.random.PRNGKey(0), z, water, method=vae.NoiseVAE.decode)


def test_level_moments_compare_training_noise_with_samples(trained):
  model, params, batch, *_ = trained
  data_ms, sample_ms = vae.level_moments(params, batch, jax.random.PRNGKey(4), model=model)
  np.testing.assert_allclose(float(data_ms), float(jnp.mean(jnp.square(batch["noise"]))),
                             rtol=1e-6)
  draw = model.apply(params, batch["condition"], jax.random.PRNGKey(4),
                     method=vae.NoiseVAE.sample)
  np.testing.assert_allclose(float(sample_ms), float(jnp.mean(jnp.square(draw))), rtol=1e-6)
  # edge_hu: averages over the flat pixels of the structure (here a 400 HU
  # step through the middle of every patch), for data and sample alike.
  step_up = jnp.zeros_like(batch["condition"]).at[:, :, 8:].set(400.0 / NORM.scale)
  edged = {**batch, "condition": batch["condition"] + step_up}
  flat = vae.flat_weight(edged["condition"], 40.0, normalization=NORM)
  assert 0.2 < float(jnp.mean(flat)) < 0.8
  data_flat, sample_flat = vae.level_moments(params, edged, jax.random.PRNGKey(4), model=model,
                                             edge_hu=40.0)
  draw = model.apply(params, edged["condition"], jax.random.PRNGKey(4),
                     method=vae.NoiseVAE.sample)
  mean_over_flat = lambda x: float(jnp.sum(flat * jnp.square(x)) / jnp.sum(flat))
  np.testing.assert_allclose(float(data_flat), mean_over_flat(batch["noise"]), rtol=1e-6)
  np.testing.assert_allclose(float(sample_flat), mean_over_flat(draw), rtol=1e-6)


def test_flat_weight_excludes_edges_texture_and_air():
  # Left half 0 HU, right half 200 HU, top rows air: only pixels more than
  # 3 px (the radius) from the step and inside the body are flat.
  hu = np.zeros((1, 32, 32), np.float32)
  hu[:, :, 16:] = 200.0
  hu[:, :6] = -1000.0
  structure = jnp.asarray(NORM.normalize(hu))[..., None]
  weight = np.asarray(vae.flat_weight(structure, edge_hu=40.0, radius=3,
                                      normalization=NORM))[0, :, :, 0]
  assert set(np.unique(weight)) == {0.0, 1.0}
  assert weight[:6].sum() == 0  # air
  assert weight[6:9].sum() == 0  # within 3 px of the air/body edge
  # The step sits between columns 15 and 16; central differences see it at
  # 15 and 16, so the flat band ends 3 px further.
  assert weight[12:, 12:20].sum() == 0
  assert weight[12:, :12].all() and weight[12:, 20:].all()
  np.testing.assert_array_equal(vae.flat_weight(structure, edge_hu=0.0, normalization=NORM), 1.0)


def test_weighted_elbo_ignores_unobserved_pixels():
  # num_down 0: encoder and decoder each see +-3 px, so changing rows 0-1
  # moves codes and reconstructions of rows <= 7 only. With the KL off, a
  # likelihood restricted to rows >= 16 must not notice; the full one must.
  model = vae.NoiseVAE(normalization=NORM, latent_channels=2, features=4, num_down=0)
  keys = jax.random.split(jax.random.PRNGKey(7), 3)
  noise = _correlated_noise(keys[0], (2, 32, 32, 1))
  batch = {"noise": noise, "condition": jnp.full_like(noise, 0.25),
           "weight": jnp.zeros_like(noise).at[:, 16:].set(1.0)}
  params = model.init(keys[1], noise, batch["condition"], keys[1], train=True)
  changed = noise.at[:, :2].add(0.05)  # 200 HU
  loss = lambda b: vae.elbo_loss(params, b, keys[2], 0.0, model=model)
  first, metrics_first = loss(batch)
  np.testing.assert_allclose(float(loss({**batch, "noise": changed})[0]), float(first),
                             rtol=1e-5)
  assert float(metrics_first["observed_fraction"]) == pytest.approx(0.5)
  unweighted = {k: v for k, v in batch.items() if k != "weight"}
  assert float(loss({**unweighted, "noise": changed})[0]) > float(loss(unweighted)[0]) + 10.0


def test_level_moments_ema_and_sample_gain():
  moments = vae.update_level_moments((jnp.ones(()), jnp.ones(())), (4.0, 1.0), True)
  np.testing.assert_allclose([float(m) for m in moments], [4.0, 1.0])
  moments = vae.update_level_moments(moments, (0.0, 2.0), False)
  d = vae.LEVEL_EMA_DECAY
  np.testing.assert_allclose([float(m) for m in moments], [4.0 * d, d + 2.0 * (1 - d)], rtol=1e-6)
  assert float(vae.sample_gain((jnp.asarray(4.0), jnp.asarray(1.0)))) == pytest.approx(2.0)


def test_everything_in_hu_is_the_same_under_another_normalization():
  # Nothing in vae.py may assume (HU + 1024) / 4096: the same HU images
  # under another affine map must give the same noise, structure, noise
  # estimate and flat pixels, and (same parameters, same key) the same
  # samples and ELBO metrics, all in HU. The NLL is a log-density in network
  # units, so it moves by exactly log(4096 / 2000) per observed pixel.
  other = Normalization(shift=-1000.0, scale=2000.0)
  rng = np.random.default_rng(0)
  hu = np.zeros((2, 32, 32), np.float32)
  hu[:, :, 16:] = 200.0
  hu[:, :6] = -1000.0
  hu = hu + rng.normal(0.0, 20.0, hu.shape).astype(np.float32) * (hu > -1000)
  out = {}
  for norm in (NORM, other):
    x = jnp.asarray(norm.normalize(hu))[..., None]
    noise, structure = vae.extract_noise(x, normalization=norm, range_factor=5.0)
    out[norm] = dict(
        noise=np.asarray(noise) * norm.scale,
        structure=np.asarray(norm.denormalize(structure)),
        std=np.asarray(vae.estimate_noise_std(x, norm)) * norm.scale,
        flat=np.asarray(jax.jit(functools.partial(vae.flat_weight, edge_hu=40.0,
                                                  normalization=norm))(structure)),
        batch={"noise": noise, "condition": structure})
  a, b = out[NORM], out[other]
  np.testing.assert_allclose(a["std"], b["std"], rtol=1e-4)
  assert 18.0 < float(a["std"].mean()) < 22.0  # the white noise's 20 HU
  np.testing.assert_allclose(a["noise"], b["noise"], atol=0.02)
  np.testing.assert_allclose(a["structure"], b["structure"], atol=0.02)
  assert 0.2 < a["flat"].mean() < 0.8
  assert np.mean(a["flat"] != b["flat"]) <= 1e-3
  models = {norm: vae.NoiseVAE(**{**TINY, "normalization": norm}) for norm in (NORM, other)}
  params = jax.jit(functools.partial(models[NORM].init, train=True))(
      jax.random.PRNGKey(0), a["batch"]["noise"], a["batch"]["condition"], jax.random.PRNGKey(1))
  samples, metrics_ = {}, {}
  for norm, model in models.items():
    draw = jax.jit(functools.partial(model.apply, method=vae.NoiseVAE.sample))(
        params, out[norm]["batch"]["condition"], jax.random.PRNGKey(2))
    samples[norm] = np.asarray(draw) * norm.scale
    metrics_[norm] = jax.jit(functools.partial(vae.elbo_loss, model=model))(
        params, out[norm]["batch"], jax.random.PRNGKey(3), 1.0)[1]
  assert 5.0 < samples[NORM].std() < 100.0
  np.testing.assert_allclose(samples[NORM], samples[other], rtol=1e-4, atol=0.01)
  for key in ("recon_rmse_hu", "sigma_hu", "kl"):
    np.testing.assert_allclose(float(metrics_[NORM][key]), float(metrics_[other][key]),
                               rtol=1e-4)
  np.testing.assert_allclose(float(metrics_[other]["nll"] - metrics_[NORM]["nll"]),
                             np.log(4096.0 / 2000.0), rtol=1e-4)
