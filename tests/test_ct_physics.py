"""CT physics against skimage, closed forms and exact statistics.

References: ``skimage.transform.radon``/``iradon`` (same conventions, degrees,
transposed sinogram), analytic projections of discs and Gaussian blobs, and
the Poisson/binomial moments of the count model.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.data import shepp_logan_phantom
from skimage.transform import iradon
from skimage.transform import radon as skimage_radon
from skimage.transform import rescale

from ldct_jax.physics import ct


@functools.lru_cache(maxsize=None)
def _phantom(size):
  return rescale(shepp_logan_phantom(), size / 400.0).astype(np.float32)


def _disc_mask(size):
  rows, cols = np.mgrid[:size, :size] - size // 2
  return rows ** 2 + cols ** 2 <= (size // 2 - 1) ** 2


def _psnr(estimate, truth, mask):
  """PSNR in dB inside ``mask``, data range = the truth's maximum there."""
  mse = np.mean((np.asarray(estimate)[mask] - truth[mask]) ** 2)
  return 10.0 * np.log10(truth[mask].max() ** 2 / mse)


def _rel_l2(estimate, reference):
  return np.linalg.norm(np.asarray(estimate) - reference) / np.linalg.norm(reference)


def _antialiased_disc(size, radius_mm, pixel_size, centre_mm=(0.0, 0.0), supersample=8):
  """Pixel-area fraction inside a disc (x right, y up; isocentre at size // 2)."""
  sub = (np.arange(size * supersample) + 0.5) / supersample - 0.5
  x = (sub - size // 2) * pixel_size - centre_mm[0]
  y = (size // 2 - sub) * pixel_size - centre_mm[1]
  inside = (x[None, :] ** 2 + y[:, None] ** 2) <= radius_mm ** 2
  return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3)).astype(np.float32)


def _gaussian_blob(size, pixel_size, centre_mm, sigma_mm, peak):
  x = (np.arange(size) - size // 2) * pixel_size
  y = (size // 2 - np.arange(size)) * pixel_size
  r2 = (x[None, :] - centre_mm[0]) ** 2 + (y[:, None] - centre_mm[1]) ** 2
  return (peak * np.exp(-r2 / (2 * sigma_mm ** 2))).astype(np.float32)


def _blob_projection(theta, t, centre_mm, sigma_mm, peak):
  """Exact line integral of the blob along the parallel ray (theta, t)."""
  t0 = centre_mm[0] * np.cos(theta) + centre_mm[1] * np.sin(theta)
  return peak * sigma_mm * np.sqrt(2 * np.pi) * np.exp(-(t - t0) ** 2 / (2 * sigma_mm ** 2))


# ----------------------------------------------------------------------------
# Units.


def test_hu_mu_conversions():
  assert ct.hu_to_mu(0.0) == pytest.approx(ct.MU_WATER)
  assert ct.hu_to_mu(-1000.0) == pytest.approx(0.0)
  assert ct.hu_to_mu(1000.0, mu_water=0.02) == pytest.approx(0.04)
  hu = np.linspace(-1024, 3000, 9)
  np.testing.assert_allclose(ct.mu_to_hu(ct.hu_to_mu(hu)), hu, atol=1e-9)
  assert 0.018 < ct.MU_WATER < 0.021  # 1/mm at ~70 keV


# ----------------------------------------------------------------------------
# Parallel beam against skimage.


def _skimage_comparison(size, num_angles):
  x = _phantom(size)
  theta_deg = np.arange(num_angles) * 180.0 / num_angles
  angles = np.deg2rad(theta_deg)
  reference_sino = skimage_radon(x, theta_deg).T
  ours_sino = np.asarray(jax.jit(lambda im: ct.radon(im, angles))(x))
  reference_rec = iradon(reference_sino.T, theta_deg)
  ours_rec = np.asarray(jax.jit(lambda s: ct.fbp(s, angles, size))(ours_sino))
  return x, ours_sino, reference_sino, ours_rec, reference_rec


def test_radon_and_fbp_match_skimage_128():
  x, sino, ref_sino, rec, ref_rec = _skimage_comparison(128, 180)
  assert sino.shape == (180, 128)
  assert _rel_l2(sino, ref_sino) < 1.5e-2  # measured 5.7e-3
  assert _rel_l2(rec, ref_rec) < 5e-2  # measured 4.1e-2
  mask = _disc_mask(128)
  ours, skimage_psnr = _psnr(rec, x, mask), _psnr(ref_rec, x, mask)
  assert ours > skimage_psnr - 0.5, (ours, skimage_psnr)  # 28.6 vs 28.8 dB


@pytest.mark.slow
def test_radon_and_fbp_match_skimage_512():
  x, sino, ref_sino, rec, ref_rec = _skimage_comparison(512, 720)
  assert _rel_l2(sino, ref_sino) < 5e-3  # measured 1.4e-3
  assert _rel_l2(rec, ref_rec) < 5e-2  # measured 1.7e-2
  assert _psnr(rec, x, _disc_mask(512)) > 30.0  # measured 35.6 (skimage 35.9)


@functools.lru_cache(maxsize=None)
def _skimage_sinogram_128():
  theta_deg = np.arange(90) * 2.0
  return theta_deg, skimage_radon(_phantom(128), theta_deg)


@pytest.mark.parametrize("filter_name", ct.FILTERS)
def test_filters_match_iradon(filter_name):
  theta_deg, sino = _skimage_sinogram_128()
  ours = ct.fbp(sino.T.astype(np.float32), np.deg2rad(theta_deg), 128, filter_name)
  reference = iradon(sino, theta_deg, filter_name=filter_name)
  assert _rel_l2(ours, reference) < 5e-2  # measured 1.8e-2 (hann) to 3.3e-2 (ramp)
  if filter_name != "ramp":  # the window is really applied: closer to skimage's same filter
    assert _rel_l2(ours, reference) < 0.8 * _rel_l2(ours, iradon(sino, theta_deg))


def test_unknown_filter_is_rejected():
  with pytest.raises(ValueError, match="unknown filter"):
    ct.fbp(np.zeros((4, 16), np.float32), np.arange(4) * np.pi / 4, 16, "butterworth")


def test_traced_angles_are_rejected():
  with pytest.raises(TypeError, match="concrete"):
    jax.jit(ct.radon)(np.zeros((8, 8), np.float32), np.arange(4.0))


# ----------------------------------------------------------------------------
# Closed forms.


@pytest.mark.parametrize("theta_deg", [0.0, 17.0, 45.0, 90.0, 133.0])
def test_radon_of_disc_is_chord_length(theta_deg):
  pixel_size, spacing, radius, mu = 0.5, 0.7, 20.0, 0.02
  disc = mu * _antialiased_disc(96, radius, pixel_size)
  sino = np.asarray(ct.radon(disc, np.deg2rad([theta_deg]), 61, pixel_size=pixel_size,
                             detector_spacing=spacing))[0]
  t = (np.arange(61) - 30) * spacing
  chord = 2 * mu * np.sqrt(np.clip(radius ** 2 - t ** 2, 0, None))
  inner = np.abs(t) < 0.9 * radius
  np.testing.assert_allclose(sino[inner], chord[inner], rtol=1e-2)
  assert np.all(np.abs(sino[np.abs(t) > radius + 2 * pixel_size]) < 1e-4)


def test_radon_orientation_matches_analytic_blob():
  """An off-centre blob pins down angle direction, t sign and pixel size."""
  pixel_size, centre, sigma, peak = 0.8, (14.0, -9.0), 4.0, 0.03
  blob = _gaussian_blob(80, pixel_size, centre, sigma, peak)
  angles = np.deg2rad([0.0, 30.0, 75.0, 120.0, 160.0])
  sino = np.asarray(ct.radon(blob, angles, 101, pixel_size=pixel_size, detector_spacing=0.9))
  t = (np.arange(101) - 50) * 0.9
  expected = _blob_projection(angles[:, None], t[None, :], centre, sigma, peak)
  # Interpolating a sampled blob smooths it slightly (< 1% of the peak); a
  # wrong orientation or scale would be off by the whole peak.
  np.testing.assert_allclose(sino, expected, atol=1e-2 * expected.max())


def test_fbp_of_disc_recovers_attenuation():
  pixel_size, radius, mu = 1.2, 40.0, 0.0192
  disc = mu * _antialiased_disc(96, radius, pixel_size)
  geometry = ct.ParallelBeamGeometry.for_image(96, pixel_size)
  rec = np.asarray(geometry.reconstruct(geometry.project(disc, pixel_size), 96, pixel_size))
  inner = _antialiased_disc(96, radius - 6.0, pixel_size) == 1.0
  assert abs(rec[inner].mean() / mu - 1.0) < 2e-3
  assert rec[inner].std() / mu < 2e-2


# ----------------------------------------------------------------------------
# Linearity and adjointness.


def test_radon_is_linear_and_backproject_is_its_scaled_adjoint():
  pixel_size, spacing = 0.9, 1.3
  angles = np.arange(60) * np.pi / 60
  x = _gaussian_blob(64, pixel_size, (6.0, 3.0), 7.0, 1.0)
  z = _gaussian_blob(64, pixel_size, (-8.0, 5.0), 5.0, 1.0)
  project = lambda im: np.asarray(ct.radon(im, angles, 48, pixel_size=pixel_size,
                                            detector_spacing=spacing), np.float64)
  np.testing.assert_allclose(project(2.0 * x - 3.0 * z), 2.0 * project(x) - 3.0 * project(z),
                             atol=1e-4 * np.abs(project(z)).max())

  # Exact adjoint of the (linear) projector, from JAX's transpose of it.
  sino_y = project(z).astype(np.float32)
  radon_t = jax.linear_transpose(
      lambda im: ct.radon(im, angles, 48, pixel_size=pixel_size, detector_spacing=spacing), x)
  (exact_adjoint_y,) = radon_t(sino_y)
  lhs = np.vdot(project(x), sino_y)
  assert np.vdot(x, exact_adjoint_y) == pytest.approx(lhs, rel=1e-4)

  # Pixel-driven back-projection ~ (spacing / pixel^2) x adjoint for smooth data.
  back = np.asarray(ct.backproject(sino_y, angles, 64, pixel_size=pixel_size,
                                   detector_spacing=spacing), np.float64)
  assert np.vdot(x, back) * pixel_size ** 2 / spacing == pytest.approx(lhs, rel=1e-2)


# ----------------------------------------------------------------------------
# Fan beam.


_FAN = dict(source_to_center=746.02, source_to_detector=1361.2)


def test_fan_radon_matches_parallel_rays_of_analytic_blob():
  """Fan ray (b, g) is the parallel ray theta = b + g, t = R sin g."""
  pixel_size, centre, sigma, peak = 1.0, (-12.0, 7.0), 4.0, 0.02
  blob = _gaussian_blob(64, pixel_size, centre, sigma, peak)
  pitch = 1.5e-3
  views = np.deg2rad([0.0, 50.0, 200.0, 300.0])
  sino = np.asarray(ct.fan_radon(blob, views, 81, detector_angle_spacing=pitch,
                                 pixel_size=pixel_size, **_FAN))
  gamma = (np.arange(81) - 40) * pitch
  expected = _blob_projection(views[:, None] + gamma[None, :], _FAN["source_to_center"]
                              * np.sin(gamma)[None, :], centre, sigma, peak)
  np.testing.assert_allclose(sino, expected, atol=1e-2 * expected.max())


def test_fan_detector_spacing_equals_angle_spacing_times_distance():
  image = _gaussian_blob(32, 1.0, (3.0, 2.0), 4.0, 0.02)
  views = np.array([0.3, 2.0])
  by_angle = ct.fan_radon(image, views, 41, detector_angle_spacing=1e-3, **_FAN)
  by_arc = ct.fan_radon(image, views, 41, detector_spacing=1e-3 * _FAN["source_to_detector"],
                        **_FAN)
  np.testing.assert_allclose(by_angle, by_arc, rtol=1e-5, atol=1e-7)


def test_fan_angle_arctangent_matches_numpy():
  rng = np.random.default_rng(0)
  along = np.abs(rng.standard_normal(50_000)).astype(np.float32) + 1e-3
  across = (3.0 * rng.standard_normal(50_000)).astype(np.float32)
  ours = np.asarray(ct._arctan_ratio(jnp.asarray(across), jnp.asarray(along)))
  np.testing.assert_allclose(ours, np.arctan2(across.astype(np.float64), along), atol=3e-7)


def test_fan_fbp_reconstructs_phantom_and_disc():
  size, pixel_size = 128, 350.0 / 128
  geometry = ct.FanBeamGeometry.for_image(size, pixel_size, num_views=360)
  x = 0.02 * _phantom(size)
  rec = np.asarray(geometry.reconstruct(geometry.project(x, pixel_size), size, pixel_size))
  assert _psnr(rec, x, _disc_mask(size)) > 29.0  # measured 31.4 dB

  radius, mu = 100.0, 0.0192
  disc = mu * _antialiased_disc(size, radius, pixel_size)
  rec = np.asarray(geometry.reconstruct(geometry.project(disc, pixel_size), size, pixel_size))
  inner = _antialiased_disc(size, radius - 10.0, pixel_size) == 1.0
  assert abs(rec[inner].mean() / mu - 1.0) < 5e-3


# ----------------------------------------------------------------------------
# Count statistics.


@pytest.mark.parametrize("exact", [False, True])
def test_binomial_thinning_moments_and_nesting(exact):
  incident, sigma_e, p = 2000.0, math.sqrt(11.0), 1.5
  mean_full = incident * math.exp(-p)  # 446 photons
  fractions = (1.0, 0.25, 0.5)
  n = 100_000
  sample = functools.partial(
      ct.sample_dose_level_counts, np.full((n,), p, np.float32), fractions,
      incident_flux=incident, exact_counts=exact)
  counts = np.asarray(sample(jax.random.key(0), electronic_noise_std=sigma_e), np.float64)
  assert counts.shape == (3, n)
  for level, fraction in zip(counts, fractions):
    mean = fraction * mean_full
    assert abs(level.mean() - mean) < 5 * math.sqrt((mean + sigma_e ** 2) / n)
    assert level.var() == pytest.approx(mean + sigma_e ** 2, rel=0.03)
  # Nested: Cov(y_f, y_g) = min(f, g) * mean_full for thinned photons; the
  # electronic noise is independent between levels.
  for (i, f), (j, g) in [((0, 1.0), (1, 0.25)), ((0, 1.0), (2, 0.5)), ((2, 0.5), (1, 0.25))]:
    cov = np.cov(counts[i], counts[j])[0, 1]
    assert cov == pytest.approx(min(f, g) * mean_full, rel=0.06)
  if exact:  # photon counts: integers, each dose level a subset of the higher ones
    photons = np.asarray(sample(jax.random.key(1), electronic_noise_std=0.0))
    np.testing.assert_array_equal(photons, np.round(photons))
    assert np.all(photons[0] >= photons[2]) and np.all(photons[2] >= photons[1])
    # Large counts (4.5e5 photons) stay exact in float32 and unbiased.
    bright = np.asarray(sample(jax.random.key(2), electronic_noise_std=0.0,
                               incident_flux=2e6), np.float64)
    assert bright[0].mean() == pytest.approx(2e6 * math.exp(-p), rel=1e-3)
    assert bright[1].var() == pytest.approx(0.25 * 2e6 * math.exp(-p), rel=0.03)


def test_dose_fractions_are_validated():
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    ct.sample_dose_level_counts(np.zeros(3, np.float32), (1.0, 1.5), jax.random.key(0))
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    ct.simulate_low_dose(np.zeros((16, 16), np.float32), 0.0, jax.random.key(0))


# ----------------------------------------------------------------------------
# Dose simulation.


def _water_cylinder(size, radius_mm, pixel_size):
  return (1000.0 * _antialiased_disc(size, radius_mm, pixel_size) - 1000.0).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _water_noise_levels():
  size, pixel_size = 128, 350.0 / 128
  water = np.stack([_water_cylinder(size, 100.0, pixel_size)] * 4)
  levels = np.asarray(ct.simulate_dose_levels(water, (1.0, 0.25), jax.random.key(7)))
  rows, cols = (np.mgrid[:size, :size] - size // 2) * pixel_size
  roi = rows ** 2 + cols ** 2 <= 60.0 ** 2
  return levels, roi


def test_noise_grows_as_inverse_sqrt_dose_and_mean_is_unbiased():
  levels, roi = _water_noise_levels()
  assert levels.shape == (2, 4, 128, 128)
  std_full, std_quarter = levels[0][:, roi].std(), levels[1][:, roi].std()
  assert std_quarter / std_full == pytest.approx(2.0, abs=0.2)
  assert abs(levels[0][:, roi].mean()) < 3.0 and abs(levels[1][:, roi].mean()) < 6.0


def test_noise_is_spatially_correlated():
  levels, roi = _water_noise_levels()
  noise = levels[1] - levels[1][:, roi].mean()
  inner = roi & np.roll(roi, 1, axis=1)
  neighbours = np.corrcoef(noise[:, inner].ravel(), np.roll(noise, 1, axis=2)[:, inner].ravel())
  white = np.random.default_rng(0).standard_normal(noise.shape)
  white_neighbours = np.corrcoef(white[:, inner].ravel(),
                                 np.roll(white, 1, axis=2)[:, inner].ravel())
  assert abs(white_neighbours[0, 1]) < 0.03
  assert abs(neighbours[0, 1]) > 0.1, neighbours[0, 1]


def test_simulation_is_deterministic_per_key_and_keeps_shape():
  water = _water_cylinder(64, 60.0, 350.0 / 64)
  first = ct.simulate_low_dose(water, 0.25, jax.random.key(1))
  again = ct.simulate_low_dose(water, 0.25, jax.random.key(1))
  other = ct.simulate_low_dose(water, 0.25, jax.random.key(2))
  assert first.shape == water.shape
  np.testing.assert_array_equal(first, again)
  assert np.std(np.asarray(first) - np.asarray(other)) > 10.0  # HU
  np.testing.assert_array_equal(
      first, ct.simulate_dose_levels(water, [0.25], jax.random.key(1))[0])


def test_simulation_with_fan_geometry():
  size, pixel_size = 48, 350.0 / 48
  water = _water_cylinder(size, 120.0, pixel_size)
  geometry = ct.FanBeamGeometry.for_image(size, pixel_size, num_views=120)
  out = np.asarray(ct.simulate_dose_levels(water, (1.0, 0.25), jax.random.key(0),
                                           geometry=geometry))
  rows, cols = (np.mgrid[:size, :size] - size // 2) * pixel_size
  roi = rows ** 2 + cols ** 2 <= 80.0 ** 2
  assert out.shape == (2, size, size)
  assert abs(out[0][roi].mean()) < 15.0
  assert out[1][roi].std() > out[0][roi].std()


# ----------------------------------------------------------------------------
# JAX transformations.


def test_batching_jit_and_vmap_agree():
  angles = np.arange(30) * np.pi / 30
  batch = np.stack([_phantom(32), 0.5 * _phantom(32)[::-1]])
  batched = ct.radon(batch, angles)
  mapped = jax.vmap(lambda im: ct.radon(im, angles))(batch)
  jitted = jax.jit(lambda im: ct.radon(im, angles))(batch[1])
  np.testing.assert_allclose(batched, mapped, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(batched[1], jitted, rtol=1e-5, atol=1e-5)
  recon = ct.fbp(batched, angles, 32)
  np.testing.assert_allclose(recon[1], ct.fbp(batched[1], angles, 32), rtol=1e-5, atol=1e-5)


def test_gradient_through_fbp_of_radon_matches_finite_differences():
  angles = np.arange(12) * np.pi / 12
  target = jnp.asarray(_phantom(16))

  def loss(image):
    return jnp.sum((ct.fbp(ct.radon(image, angles), angles, 16) - target) ** 2)

  image = jnp.asarray(np.random.default_rng(0).random((16, 16)), jnp.float32)
  direction = jnp.asarray(np.random.default_rng(1).standard_normal((16, 16)), jnp.float32)
  grad = jax.grad(loss)(image)
  eps = 1e-2
  numeric = (loss(image + eps * direction) - loss(image - eps * direction)) / (2 * eps)
  assert float(jnp.vdot(grad, direction)) == pytest.approx(float(numeric), rel=2e-3)
