"""CS-TV against independent references: scikit-image's Chambolle TV denoiser, a SciPy L-BFGS
solve of the objective in NumPy float64, and the zero-filled baseline on Shepp-Logan."""
import numpy as np
import pytest
from scipy import optimize
from skimage.data import shepp_logan_phantom
from skimage.restoration import denoise_tv_chambolle
from skimage.transform import resize

from ldct_jax.physics import mri
from ldct_jax.recon import cs
from conftest import np_fft2c, np_ifft2c


def np_tv(x, eps=0.0):
  """Isotropic TV in float64 with np.diff (the last difference along each axis is zero)."""
  dv = np.zeros(x.shape, x.dtype)
  dh = np.zeros(x.shape, x.dtype)
  dv[:-1] = np.diff(x, axis=0)
  dh[:, :-1] = np.diff(x, axis=1)
  return np.sum(np.sqrt(np.abs(dv) ** 2 + np.abs(dh) ** 2 + eps ** 2)), dv, dh


def shepp_logan(size, phase=True):
  image = resize(shepp_logan_phantom(), (size, size), anti_aliasing=True)
  yy, xx = np.mgrid[:size, :size] / size - 0.5
  return image, image * np.exp(1j * phase * (1.5 * xx - yy + 2 * xx * yy))


def psnr(x, ref):
  return 10 * np.log10(ref.max() ** 2 / np.mean((x - ref) ** 2))


def test_tv_prox_matches_skimage_chambolle():
  rng = np.random.default_rng(0)
  image, _ = shepp_logan(48, phase=False)
  noisy = image + 0.1 * rng.standard_normal(image.shape)
  weight = 0.08
  reference = denoise_tv_chambolle(noisy, weight=weight, eps=1e-9, max_num_iter=20000)
  ours, _ = cs.tv_prox(noisy.astype(np.float32), weight, 2000)
  np.testing.assert_allclose(np.asarray(ours), reference, atol=2e-3)
  assert float(cs.total_variation(noisy.astype(np.float32))) == pytest.approx(np_tv(noisy)[0], rel=1e-5)


def test_fully_sampled_cs_tv_is_tv_denoising_of_the_image():
  """With M = 1 the problem is ROF denoising of ifft2c(k0): skimage solves it independently."""
  rng = np.random.default_rng(1)
  image, _ = shepp_logan(40, phase=False)
  noisy = image + 0.05 * rng.standard_normal(image.shape)
  k0 = np_fft2c(noisy).astype(np.complex64)
  full = np.ones(k0.shape, np.float32)
  lam = 0.05
  x = np.asarray(cs.cs_tv(k0, full, lam, 300, inner_iters=20))
  weight = lam * np.abs(noisy).max()  # the relative lam
  reference = denoise_tv_chambolle(noisy, weight=weight, eps=1e-9, max_num_iter=20000)
  np.testing.assert_allclose(x.real, reference, atol=2e-3)
  assert np.abs(x.imag).max() < 1e-4


def test_cs_tv_reaches_the_optimum_of_an_independent_lbfgs_solve():
  """Undersampled, complex: MFISTA's objective is at least as low as SciPy L-BFGS-B's on the
  (slightly smoothed) objective written in NumPy float64, and the images agree."""
  size = 16
  _, image = shepp_logan(size)
  mask = mri.make_mask("random", (size, size), 3, center_fraction=0.15, seed=2)
  k0 = mask * np_fft2c(image)
  lam = 0.02
  lam_eff = lam * np.abs(np_ifft2c(k0)).max()
  eps = 1e-5

  def objective(v):
    x = v[:size * size].reshape(size, size) + 1j * v[size * size:].reshape(size, size)
    residual = mask * np_fft2c(x) - k0
    tv, dv, dh = np_tv(x, eps)
    norm = np.sqrt(np.abs(dv) ** 2 + np.abs(dh) ** 2 + eps ** 2)
    qv, qh = dv / norm, dh / norm
    # Adjoint of the forward differences: (D^T q)_i = q_{i-1} - q_i.
    adjoint = np.zeros_like(x)
    adjoint[1:] += qv[:-1]
    adjoint[:-1] -= qv[:-1]
    adjoint[:, 1:] += qh[:, :-1]
    adjoint[:, :-1] -= qh[:, :-1]
    grad = np_ifft2c(mask * residual) + lam_eff * adjoint
    value = 0.5 * np.sum(np.abs(residual) ** 2) + lam_eff * tv
    return value, np.concatenate([grad.real.ravel(), grad.imag.ravel()])

  x0 = np_ifft2c(k0)
  solved = optimize.minimize(objective, np.concatenate([x0.real.ravel(), x0.imag.ravel()]),
                             jac=True, method="L-BFGS-B",
                             options={"maxiter": 20000, "ftol": 1e-10, "gtol": 1e-10})
  reference = solved.x[:size * size].reshape(size, size) + 1j * solved.x[size * size:].reshape(size, size)
  x, ours = cs.cs_tv(k0.astype(np.complex64), mask, lam, 1000, inner_iters=20,
                     return_objective=True)
  x = np.asarray(x, np.complex128)
  ours_f64 = objective(np.concatenate([x.real.ravel(), x.imag.ravel()]))[0]
  assert float(ours) == pytest.approx(ours_f64, rel=1e-4)  # cs_objective vs NumPy
  assert ours_f64 <= solved.fun * (1 + 1e-3), (ours_f64, solved.fun)
  np.testing.assert_allclose(np.abs(x), np.abs(reference), atol=0.02 * np.abs(reference).max())


def test_cs_tv_beats_zero_filled_on_shepp_logan_and_decreases_monotonically():
  size = 128
  magnitude, image = shepp_logan(size)
  mask = mri.make_mask("random", (size, size), 4, seed=1)
  k0 = (mask * np_fft2c(image)).astype(np.complex64)
  zero_filled = np.abs(np_ifft2c(k0))
  x = np.abs(np.asarray(cs.cs_tv(k0, mask, 1e-3, 100)))
  gain = psnr(x, magnitude) - psnr(zero_filled, magnitude)
  assert gain > 8.0, gain  # measured: 18.7 -> 34.9 dB
  trace = cs.objective_trace(k0[None], mask, 1e-3, 40)[:, 0]
  assert np.all(np.diff(trace) <= 0)
  assert trace[-1] < 0.9 * trace[0]  # measured: 1.05 -> 0.81


def test_batched_slices_are_independent_and_channels_api():
  size = 32
  _, a = shepp_logan(size)
  b = np.rot90(a).copy()
  masks = np.stack([mri.make_mask("random", (size, size), 4, seed=s) for s in (0, 1)])
  k0 = (masks * np_fft2c(np.stack([a, 0.01 * b]))).astype(np.complex64)
  batched = np.asarray(cs.cs_tv(k0, masks, 0.01, 20))
  for i in range(2):
    alone = np.asarray(cs.cs_tv(k0[i], masks[i], 0.01, 20))
    np.testing.assert_allclose(batched[i], alone, atol=1e-5 * np.abs(alone).max())
  channels = np.stack([k0.real, k0.imag], -1)
  out = np.asarray(cs.cs_tv_channels(channels, masks, 0.01, 20))
  np.testing.assert_allclose(out[..., 0] + 1j * out[..., 1], batched, atol=1e-6)
  # Zero iterations return the zero-filled image.
  np.testing.assert_allclose(np.asarray(cs.cs_tv(k0, masks, 0.01, 0)), np_ifft2c(k0), atol=1e-5)


def test_sweep_picks_the_best_grid_point():
  size = 48
  magnitude, image = shepp_logan(size)
  rng = np.random.default_rng(3)
  k = np_fft2c(image)
  k = k + 0.01 * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
  masks = np.stack([mri.make_mask("random", (size, size), 4, seed=s) for s in (0, 1)])
  k0 = masks * k
  to_channels = lambda z: np.stack([z.real, z.imag], -1).astype(np.float32)
  examples = {"k0": to_channels(k0), "mask": masks.astype(np.float32),
              "target": to_channels(np.stack([image, image]))}
  best = cs.sweep_cs_tv(examples, lambdas=(1e-4, 1e-2), iterations=(5, 30))
  assert len(best["table"]) == 4
  top = max(best["table"], key=lambda r: r["psnr"])
  assert (best["lam"], best["num_iters"], best["psnr"]) == (top["lam"], top["num_iters"], top["psnr"])
  # The table's PSNR is the reconstruction's, re-computed here in NumPy.
  x = np.abs(np.asarray(cs.cs_tv(k0.astype(np.complex64), masks, best["lam"], best["num_iters"])))
  assert np.mean([psnr(x[i], magnitude) for i in range(2)]) == pytest.approx(best["psnr"], abs=1e-3)
  assert all(r["seconds_per_slice"] > 0 for r in best["table"])
