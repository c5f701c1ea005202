"""MRI physics against NumPy float64/complex128 and closed forms: FFT, adjoints, masks, data consistency."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldct_jax.physics import mri


def crandn(rng, *shape):
  return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


def np_fft2c(x):
  axes = (-2, -1)
  return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=axes), axes=axes), axes=axes) / np.sqrt(
      x.shape[-1] * x.shape[-2])


def inner(a, b):
  """<a, b> = sum conj(a) b in complex128."""
  return np.vdot(np.asarray(a, np.complex128).ravel(), np.asarray(b, np.complex128).ravel())


@pytest.mark.parametrize("shape", [(2, 16, 16), (3, 12, 10), (9, 7)])
def test_fft2c_matches_numpy_is_orthonormal_and_inverted(shape):
  rng = np.random.default_rng(0)
  x = crandn(rng, *shape)
  k = np.asarray(mri.fft2c(x.astype(np.complex64)))
  np.testing.assert_allclose(k, np_fft2c(x), atol=2e-5 * np.abs(x).max() * np.sqrt(np.prod(shape[-2:])))
  # Parseval, and ifft2c(fft2c(x)) == x, per leading index.
  np.testing.assert_allclose(np.sum(np.abs(k) ** 2, axis=(-2, -1)),
                             np.sum(np.abs(x) ** 2, axis=(-2, -1)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(mri.ifft2c(k)), x, atol=1e-5)
  # DC sample sits at the centre: a constant image has only k[H//2, W//2].
  ones = np.ones(shape[-2:], np.complex64)
  dc = np.asarray(mri.fft2c(ones))
  assert np.argmax(np.abs(dc)) == (shape[-2] // 2) * shape[-1] + shape[-1] // 2
  np.testing.assert_allclose(np.abs(dc).max(), np.sqrt(np.prod(shape[-2:])), rtol=1e-5)


def test_channels_round_trip():
  rng = np.random.default_rng(1)
  z = crandn(rng, 2, 5, 6).astype(np.complex64)
  c = mri.complex_to_channels(z)
  assert c.shape == (2, 5, 6, 2) and c.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(c)[..., 0], z.real)
  np.testing.assert_array_equal(np.asarray(c)[..., 1], z.imag)
  np.testing.assert_array_equal(np.asarray(mri.channels_to_complex(c)), z)


def test_single_coil_adjointness_against_numpy():
  rng = np.random.default_rng(2)
  shape = (12, 16)
  mask = mri.make_mask("random", shape, 4, seed=3)
  x, y = crandn(rng, *shape), crandn(rng, *shape)
  ax = np.asarray(mri.masked_fft(x, mask), np.complex128)
  ahy = np.asarray(mri.masked_ifft(y, mask), np.complex128)
  np.testing.assert_allclose(ax, mask * np_fft2c(x), atol=1e-5)
  lhs, rhs = inner(ax, y), inner(x, ahy)
  assert abs(lhs - rhs) < 1e-5 * abs(lhs)


def test_sense_adjointness_and_forward_against_numpy():
  rng = np.random.default_rng(3)
  coils, shape = 4, (10, 14)
  maps = crandn(rng, coils, *shape)
  maps /= np.sqrt(np.sum(np.abs(maps) ** 2, axis=0, keepdims=True))
  mask = mri.make_mask("equispaced", shape, 4, seed=0)
  x, y = crandn(rng, *shape), crandn(rng, coils, *shape)
  ax = np.asarray(mri.sense_forward(x, maps, mask), np.complex128)
  np.testing.assert_allclose(ax, mask * np_fft2c(maps * x), atol=1e-5)
  ahy = np.asarray(mri.sense_adjoint(y, maps, mask), np.complex128)
  expected = np.sum(np.conj(maps) * np.conj(np_fft2c(np.conj(mask * y))), axis=0)  # F^H = conj F conj
  np.testing.assert_allclose(ahy, expected, atol=1e-5)
  lhs, rhs = inner(ax, y), inner(x, ahy)
  assert abs(lhs - rhs) < 1e-5 * abs(lhs)
  # Normalised maps, full sampling: A^H A = identity.
  full = np.ones(shape, np.float32)
  np.testing.assert_allclose(
      np.asarray(mri.sense_adjoint(mri.sense_forward(x, maps, full), maps, full)), x, atol=1e-4)


@pytest.mark.parametrize("acceleration, centre", [(4, 0.08), (8, 0.04)])
def test_random_mask_acceleration_and_centre(acceleration, centre):
  width = 368
  fractions = []
  for seed in range(200):
    columns = mri.random_columns(width, acceleration, seed=seed)
    n_c = int(round(width * centre))
    start = (width - n_c + 1) // 2
    assert columns[start:start + n_c].all()
    assert columns[width // 2]
    fractions.append(columns.mean())
  # E[fraction] = n_c/W + (1 - n_c/W) p = 1/R exactly; 200 seeds: std of the mean ~ 0.001.
  assert abs(np.mean(fractions) - 1.0 / acceleration) < 0.004
  # Same seed, same mask; other seed, other mask.
  np.testing.assert_array_equal(mri.random_columns(width, acceleration, seed=7),
                                mri.random_columns(width, acceleration, seed=7))
  assert (mri.random_columns(width, acceleration, seed=7) !=
          mri.random_columns(width, acceleration, seed=8)).any()
  mask = mri.make_mask("random", (5, width), acceleration, seed=1)
  assert mask.shape == (5, width) and mask.dtype == np.float32
  assert (mask == mask[:1]).all()


@pytest.mark.parametrize("acceleration", [4, 8])
def test_equispaced_mask(acceleration):
  width = 320
  for seed in range(5):
    columns = mri.equispaced_columns(width, acceleration, seed=seed)
    n_c = int(round(width * 0.32 / acceleration))
    start = (width - n_c + 1) // 2
    assert columns[start:start + n_c].all()
    assert abs(width / columns.sum() - acceleration) < 0.05 * acceleration
    outside = np.flatnonzero(columns[:start])
    gaps = np.diff(outside)
    assert gaps.max() - gaps.min() <= 1  # equal spacing up to rounding


@pytest.mark.parametrize("acceleration", [4, 8])
def test_variable_density_2d_mask(acceleration):
  shape = (48, 40)
  fractions = [mri.make_mask("variable_density_2d", shape, acceleration, seed=s).mean()
               for s in range(30)]
  assert abs(np.mean(fractions) - 1.0 / acceleration) < 0.01
  mask = mri.make_mask("variable_density_2d", shape, acceleration, center_fraction=0.2, seed=0)
  ky, kx = np.meshgrid(np.arange(48) - 24, np.arange(40) - 20, indexing="ij")
  assert mask[np.hypot(ky, kx) <= 0.2 * 40 / 2].all()
  # Denser at low frequencies than at high ones.
  radius = np.hypot(ky / 24, kx / 20)
  assert mask[radius < 0.4].mean() > 2 * mask[radius > 0.7].mean()


def test_bad_mask_arguments():
  with pytest.raises(ValueError, match="unknown mask kind"):
    mri.make_mask("spiral", (8, 8), 4)
  with pytest.raises(ValueError, match="acceleration"):
    mri.make_mask("random", (8, 8), 0.5)
  with pytest.raises(ValueError, match="centre fraction"):
    mri.random_columns(100, 4, center_fraction=0.5)


def test_center_crop_and_magnitude_image():
  x = np.arange(7 * 10).reshape(7, 10)
  np.testing.assert_array_equal(np.asarray(mri.center_crop(x, (3, 4))), x[2:5, 3:7])
  np.testing.assert_array_equal(np.asarray(mri.center_crop(x, (4, 5))), x[1:5, 2:7])  # (7-4)//2=1
  with pytest.raises(ValueError):
    mri.center_crop(x, (8, 4))
  rng = np.random.default_rng(4)
  image = crandn(rng, 16, 12)
  k = np_fft2c(image)
  np.testing.assert_allclose(np.asarray(mri.magnitude_image(k.astype(np.complex64), (8, 6))),
                             np.abs(image)[4:12, 3:9], atol=1e-5)


def test_noiseless_dc_replaces_sampled_kspace_exactly():
  rng = np.random.default_rng(5)
  shape = (2, 16, 16)
  mask = mri.make_mask("random", shape[1:], 4, seed=0)
  k0 = (mask * crandn(rng, *shape)).astype(np.complex64)
  x = crandn(rng, *shape).astype(np.complex64)
  out = np.asarray(mri.data_consistency(mri.fft2c(x), k0, mask))
  sampled = np.broadcast_to(mask, shape) > 0
  np.testing.assert_array_equal(out[sampled], k0[sampled])
  np.testing.assert_array_equal(out[~sampled], np.asarray(mri.fft2c(x))[~sampled])
  # Image-domain wrapper: the output's sampled k-space is the measurement.
  k_out = np_fft2c(np.asarray(mri.dc_image(x, k0, mask), np.complex128))
  np.testing.assert_allclose(k_out[sampled], k0[sampled], atol=1e-5)


def test_noisy_dc_elementwise_formula():
  rng = np.random.default_rng(6)
  shape = (8, 8)
  mask = mri.make_mask("variable_density_2d", shape, 2, seed=0)
  k, k0 = crandn(rng, *shape), mask * crandn(rng, *shape)
  for lam in (0.3, 2.0, 1e6):
    out = np.asarray(mri.data_consistency(k, k0, mask, lam), np.complex128)
    expected = np.where(mask > 0, (k + lam * k0) / (1 + lam), k)
    np.testing.assert_allclose(out, expected, atol=1e-5)
  # lam -> inf tends to the noiseless layer.
  np.testing.assert_allclose(np.asarray(mri.data_consistency(k, k0, mask, 1e7)),
                             np.asarray(mri.data_consistency(k, k0, mask)), atol=1e-5)


def test_dc_jacobian_wrt_input_is_the_closed_form_projection():
  """d dc_image / d x = F^H diag((1 - m) + m / (1 + lam)) F, checked on real/imag parts."""
  rng = np.random.default_rng(7)
  shape = (6, 5)
  n = shape[0] * shape[1]
  mask = mri.make_mask("random", shape, 2, center_fraction=0.2, seed=1)
  k0 = (mask * crandn(rng, *shape)).astype(np.complex64)
  x = crandn(rng, *shape)
  # Centred orthonormal DFT matrix in NumPy, column j = fft2c(e_j).
  f = np.stack([np_fft2c(e.reshape(shape)).ravel() for e in np.eye(n)], axis=1)
  for lam in (None, 0.7):
    diag = (1 - mask) + mask * (0.0 if lam is None else 1.0 / (1 + lam))
    jac_c = f.conj().T @ np.diag(diag.ravel()) @ f  # complex-linear in x: J = F^H D F

    def real_map(v, lam=lam):
      z = jax.lax.complex(v[:n], v[n:])
      out = mri.dc_image(z.reshape(shape), k0, mask, lam).ravel()
      return jnp.concatenate([out.real, out.imag])

    v = np.concatenate([x.real.ravel(), x.imag.ravel()]).astype(np.float32)
    jac = np.asarray(jax.jacfwd(real_map)(v))
    expected = np.block([[jac_c.real, -jac_c.imag], [jac_c.imag, jac_c.real]])
    np.testing.assert_allclose(jac, expected, atol=1e-5)


def test_dc_derivative_wrt_lambda():
  rng = np.random.default_rng(8)
  shape = (8, 8)
  mask = mri.make_mask("random", shape, 2, seed=2)
  k, k0 = crandn(rng, *shape).astype(np.complex64), (mask * crandn(rng, *shape)).astype(np.complex64)
  lam = 1.5

  def dc(l):
    return mri.data_consistency(k, k0, mask, l)

  _, tangent = jax.jvp(dc, (jnp.float32(lam),), (jnp.float32(1.0),))
  closed = np.where(mask > 0, (k0.astype(np.complex128) - k) / (1 + lam) ** 2, 0)
  np.testing.assert_allclose(np.asarray(tangent), closed, atol=1e-5)
  eps = 1e-3
  finite = (np.asarray(dc(lam + eps), np.complex128) - np.asarray(dc(lam - eps), np.complex128)) / (2 * eps)
  np.testing.assert_allclose(np.asarray(tangent), finite, atol=2e-3)


def test_physics_is_jittable():
  mask = mri.make_mask("random", (16, 16), 4, seed=0)
  x = jnp.ones((2, 16, 16), jnp.complex64)
  fn = jax.jit(lambda x, m: mri.dc_image(x, mri.masked_fft(x, m), m, 2.0))
  np.testing.assert_allclose(np.asarray(fn(x, mask)), np.asarray(x), atol=1e-5)
