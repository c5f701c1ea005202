"""Tests for ldct_jax.noise_stats: closed forms and real-vs-Gaussian CT noise."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldct_jax import metrics
from ldct_jax import noise_stats as ns
from ldct_jax.data import phantoms
from ldct_jax.physics import ct


def _two_level_reference(n=4, size=64):
  """Half -100 HU, half +300 HU: two flat regions and one vertical edge."""
  ref = np.full((n, size, size), -100.0, np.float32)
  ref[:, :, size // 2:] = 300.0
  return ref


def test_white_noise_has_flat_nps_and_constant_std_vs_hu():
  ref = _two_level_reference(n=8)
  sigma = 10.0
  noise = np.asarray(ns.gaussian_noise_like(ref, sigma, jax.random.PRNGKey(0)))
  centers, std, counts = ns.noise_std_vs_hu(ref + noise, ref, bins=[-200.0, 0.0, 200.0, 400.0])
  np.testing.assert_allclose(centers, [-100.0, 100.0, 300.0])
  assert counts[1] == 0 and np.isnan(std[1])
  np.testing.assert_allclose(std[[0, 2]], sigma, rtol=0.03)
  freqs, nps, num_rois = ns.radial_noise_nps(noise, 0.5, ref, roi=32, num_bins=8)
  assert num_rois == 8 * 9
  # White noise: NPS = sigma^2 dx dy at every frequency.
  np.testing.assert_allclose(nps, sigma**2 * 0.25, rtol=0.1)
  assert freqs[-1] < 1.0  # Nyquist of 0.5 mm pixels.


def test_flat_mask_excludes_edge_neighbourhood():
  ref = _two_level_reference(n=1)
  flat = ns.flat_mask(ref, edge_radius=3)[0]
  assert not flat[:, 28:36].any()
  assert flat[:, :24].all() and flat[:, 40:].all()


def test_filtered_noise_nps_peaks_where_filter_passes():
  # Band-pass (difference of Gaussians) white noise: the NPS must peak near
  # the filter's peak frequency, not at Nyquist or zero.
  white = jax.random.normal(jax.random.PRNGKey(1), (16, 64, 64, 1))
  band = metrics.gaussian_blur(white, 1.0) - metrics.gaussian_blur(white, 2.0)
  band = np.asarray(band)[..., 0]
  freqs, nps, _ = ns.radial_noise_nps(band, 1.0, None, roi=32, num_bins=8)
  # |G1 - G2|^2 with G_s(f) = exp(-2 pi^2 s^2 f^2) peaks at
  # f^2 = ln(4) / (2 pi^2 (s2^2 - s1^2)); sigmas 1 and 2 px: 0.153 /px.
  f_peak = np.sqrt(np.log(4.0) / (2 * np.pi**2 * 3.0))
  bin_width = 0.5 / 8
  assert abs(freqs[np.argmax(nps)] - f_peak) <= bin_width
  assert nps[np.argmax(nps)] > 5 * nps[-1] and nps[np.argmax(nps)] > 5 * nps[0]


def test_wasserstein_closed_forms():
  assert ns.histogram_distance([0.0, 1.0], [0.0, 3.0]) == pytest.approx(1.0)
  assert ns.histogram_distance([0.0], [0.0, 2.0]) == pytest.approx(1.0)
  rng = np.random.default_rng(0)
  a = rng.normal(0.0, 5.0, 200_000)
  b = rng.normal(3.0, 5.0, 150_000)
  assert ns.histogram_distance(a, b) == pytest.approx(3.0, abs=0.06)
  assert ns.histogram_distance(a, a) == 0.0
  c = rng.normal(0.0, 8.0, 200_000)
  assert ns.histogram_distance(a, c) == pytest.approx(3.0 * np.sqrt(2 / np.pi), abs=0.06)


def test_image_poisson_variance_follows_intensity_and_matches_target():
  ref = _two_level_reference(n=16)
  noise = np.asarray(ns.image_poisson_noise_like(ref, 20.0, jax.random.PRNGKey(2)))
  assert noise.std() == pytest.approx(20.0, rel=0.02)
  var_low, var_high = noise[:, :, :32].var(), noise[:, :, 32:].var()
  # Variance proportional to HU + 1024: ratio 1324 / 924.
  assert var_high / var_low == pytest.approx(1324.0 / 924.0, rel=0.05)
  jitted = jax.jit(ns.image_poisson_noise_like)(ref, 20.0, jax.random.PRNGKey(2))
  np.testing.assert_allclose(jitted, noise, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def simulated_ct():
  """Two 64^2 abdomen slices: noise-free FBP and two independent 0.25-dose scans."""
  volume = phantoms.make_volume(3, region="abdomen", size=64, num_slices=2)
  px = float(volume.pixel_spacing_mm)
  hu = jnp.asarray(volume.hu)
  geometry = ct.ParallelBeamGeometry.for_image((64, 64), px)
  noise_free = ct.mu_to_hu(geometry.reconstruct(geometry.project(ct.hu_to_mu(hu), px),
                                                (64, 64), px))
  scans = [ct.simulate_low_dose(hu, 0.25, jax.random.PRNGKey(k), incident_flux=1e5,
                                pixel_size=px) for k in (10, 11)]
  return np.asarray(noise_free), [np.asarray(s) for s in scans], px


def test_real_ct_noise_is_told_apart_from_matched_gaussian(simulated_ct):
  reference, (real, repeat), px = simulated_ct
  body = ns.body_mask(reference)
  std = float((real - reference)[body].std())
  gaussian = reference + np.asarray(
      ns.gaussian_noise_like(reference, std, jax.random.PRNGKey(3)))
  to_gaussian = ns.compare_noise(gaussian, real, reference, px, roi=16)
  to_repeat = ns.compare_noise(repeat, real, reference, px, roi=16)
  # Same variance, so only the spectrum can tell them apart ...
  assert to_gaussian["noise_std_candidate_hu"] == pytest.approx(std, rel=0.05)
  # ... and it does: an independent scan is close, matched white noise is far.
  assert to_repeat["nps_rel_l2"] < 0.25
  assert to_gaussian["nps_rel_l2"] > 2 * to_repeat["nps_rel_l2"]
  assert to_gaussian["nps_rel_l2"] > 0.4
  assert to_repeat["std_vs_hu_rel_error"] < to_gaussian["std_vs_hu_rel_error"]


def test_noise_fidelity_table_rows_match_compare_noise(simulated_ct):
  reference, (real, repeat), px = simulated_ct
  std = float((real - reference)[ns.body_mask(reference)].std())
  gaussian = reference + np.asarray(ns.gaussian_noise_like(reference, std, jax.random.PRNGKey(4)))
  table = ns.noise_fidelity_table({"repeat": repeat, "gaussian": gaussian}, real, reference, px,
                                  roi=16)
  assert list(table) == ["repeat", "gaussian"]
  assert table["gaussian"] == ns.compare_noise(gaussian, real, reference, px, roi=16)
  # Ranks as the single comparisons do: the independent scan is closer.
  assert table["repeat"]["nps_rel_l2"] < table["gaussian"]["nps_rel_l2"]
  lines = ns.fidelity_markdown(table).splitlines()
  assert len(lines) == 2 + 2 + 1  # header, rule, two candidates, real
  assert lines[2].startswith("| repeat | ") and lines[-1].startswith("| real | 0.000 |")
  assert f"{table['repeat']['nps_rel_l2']:.3f}" in lines[2]
  with pytest.raises(ValueError):
    ns.noise_fidelity_table({}, real, reference, px)
