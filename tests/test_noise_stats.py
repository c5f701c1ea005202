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


def _ring_noise(rng, shape, pixel_size_mm, peak_per_mm, width_per_mm, nps_peak):
  """Noise of a known NPS, ``nps_peak exp(-((f - peak) / width)^2)`` HU^2 mm^2, float64.

  White noise filtered in the DFT domain by a ring ``H(f)`` in mm^-1: for
  unit-variance white noise the NPS is ``dx^2 |H(f)|^2``, so the factor
  ``sqrt(nps_peak) / dx`` gives the same physical spectrum at any spacing.
  """
  white = rng.normal(size=shape)
  f = np.fft.fftfreq(shape[-1], d=pixel_size_mm)
  radius = np.hypot(f[:, None], f[None, :])
  ring = np.exp(-0.5 * ((radius - peak_per_mm) / width_per_mm) ** 2)
  field = np.fft.ifft2(np.fft.fft2(white) * ring).real
  return field * np.sqrt(nps_peak) / pixel_size_mm


def test_compare_noise_against_closed_forms_for_white_and_ring_noise():
  # Reference: two flat levels, body everywhere. Real noise white 10 HU;
  # candidates of known std and spectrum. Closed forms (float64): for white
  # noise NPS = sigma^2 dx^2 (flat), so the NPS rel. L2 of white sigma_c
  # against white sigma_r is |sigma_c^2 - sigma_r^2| / sigma_r^2; the W1 of
  # N(0, sigma_c) and N(0, sigma_r) is |sigma_c - sigma_r| sqrt(2 / pi); the
  # std-vs-HU error is |sigma_c - sigma_r| / sigma_r in every level.
  rng = np.random.default_rng(5)
  px, sigma_r, sigma_c = 0.8, 10.0, 20.0
  reference = _two_level_reference(n=8).astype(np.float64)
  real = reference + rng.normal(0.0, sigma_r, reference.shape)
  white = reference + rng.normal(0.0, sigma_c, reference.shape)
  ring = reference + _ring_noise(rng, reference.shape, px, 0.3, 0.04, 200.0)
  table = ns.noise_fidelity_table({"white": white, "ring": ring}, real, reference, px, roi=32)
  assert list(table) == ["white", "ring"]
  row = table["white"]
  assert row["noise_std_real_hu"] == pytest.approx(sigma_r, rel=0.02)
  assert row["noise_std_candidate_hu"] == pytest.approx(sigma_c, rel=0.02)
  assert row["std_vs_hu_rel_error"] == pytest.approx(abs(sigma_c - sigma_r) / sigma_r, abs=0.04)
  assert row["nps_rel_l2"] == pytest.approx(abs(sigma_c**2 - sigma_r**2) / sigma_r**2, rel=0.05)
  assert row["histogram_w1_hu"] == pytest.approx(abs(sigma_c - sigma_r) * np.sqrt(2 / np.pi),
                                                 rel=0.03)
  # The ring's NPS peaks at 0.3 mm^-1 (bins of 0.625 / 8 mm^-1 up to Nyquist).
  bin_width = 0.5 / px / 8
  assert abs(table["ring"]["nps_peak_freq_candidate"] - 0.3) <= bin_width
  lines = ns.fidelity_markdown(table).splitlines()
  assert len(lines) == 2 + 2 + 1  # header, rule, two candidates, real
  assert lines[2].startswith("| white | ") and lines[-1].startswith("| real | 0.000 |")
  assert f"{row['nps_rel_l2']:.3f}" in lines[2]
  assert f"| {row['noise_std_real_hu']:.1f} |" in lines[-1]
  with pytest.raises(ValueError):
    ns.noise_fidelity_table({}, real, reference, px)


def test_radial_nps_pools_slices_of_different_spacing_in_mm():
  # Slices 0-7 at 1.0 mm, 8-15 at 0.5 mm, the same physical noise: white noise
  # with sigma * dx fixed has the flat NPS sigma^2 dx^2 = 100 HU^2 mm^2 at
  # both spacings; a ring spectrum peaks at 0.3 mm^-1 at both. Read with one
  # spacing for all slices, the 0.5 mm half would come out 4x too weak (flat
  # case) or peak at twice its frequency (ring).
  rng = np.random.default_rng(6)
  spacings = np.repeat([1.0, 0.5], 8)
  white = np.stack([rng.normal(0.0, 10.0 / dx, (64, 64)) for dx in spacings])
  freqs, nps, num_rois = ns.radial_noise_nps(white, spacings, roi=32, num_bins=8)
  assert num_rois == 16 * 9
  np.testing.assert_allclose(freqs, (np.arange(8) + 0.5) * 0.5 / 8)  # coarsest Nyquist
  # Per bin within sampling error (the lowest bin holds the fewest samples).
  np.testing.assert_allclose(nps, 100.0, rtol=0.15)
  assert np.mean(nps) == pytest.approx(100.0, rel=0.04)
  # With one spacing the pooling reduces to metrics.radial_nps.
  rois = ns.body_rois(white[:8], np.zeros_like(white[:8]))
  pooled = ns._pooled_radial_nps(rois, np.full(len(rois), 1.0), 8)
  single = metrics.radial_nps(metrics.noise_power_spectrum(rois, 1.0), 1.0, 8)
  np.testing.assert_allclose(pooled[0], single[0], rtol=1e-6)
  np.testing.assert_allclose(pooled[1], single[1], rtol=1e-5)
  ring = np.stack([_ring_noise(rng, (64, 64), dx, 0.3, 0.04, 400.0) for dx in spacings])
  freqs, nps, _ = ns.radial_noise_nps(ring, spacings, roi=32, num_bins=8)
  assert abs(freqs[np.argmax(nps)] - 0.3) <= 0.5 / 8
  # ... and its peak level: the ring's 400 HU^2 mm^2, blurred by the bin width.
  assert 200.0 < nps.max() < 440.0
  with pytest.raises(ValueError, match="per slice"):
    ns.radial_noise_nps(white, spacings[:3])
