"""The MRI task: batches, readout crop, evaluation and the reconstruct command."""
import numpy as np
import pytest

from ldct_jax.data import mri_pipeline
from ldct_jax.physics import mri


def _complex(rng, shape):
  return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def test_numpy_fft_twins_match_physics():
  rng = np.random.default_rng(0)
  x = _complex(rng, (2, 12, 10))
  np.testing.assert_allclose(mri_pipeline.fft2c(x), np.asarray(mri.fft2c(x)), atol=1e-5)
  np.testing.assert_allclose(mri_pipeline.ifft2c(x), np.asarray(mri.ifft2c(x)), atol=1e-5)


def _reference_zero_filled(k, column_mask):
  """float64 NumPy: F^H diag(m) F per row, written with explicit DFT matrices."""
  h, w = k.shape
  def centred_dft(n):
    j = np.arange(n) - n // 2
    return np.exp(-2j * np.pi * np.outer(j, j) / n) / np.sqrt(n)
  fh, fw = centred_dft(h), centred_dft(w)
  return fh.conj().T @ (k.astype(np.complex128) * column_mask[None, :]) @ fw.conj()


@pytest.mark.parametrize("height,crop", [(16, 8), (15, 6)])
def test_readout_crop_commutes_with_column_masks(height, crop):
  """Cropping the readout then undersampling equals undersampling then cropping the
  zero-filled image (exact for column masks: the mask acts along each row only)."""
  rng = np.random.default_rng(1)
  k = _complex(rng, (height, 10))
  column_mask = (rng.random(10) < 0.5).astype(np.float64)
  full = _reference_zero_filled(k, column_mask)
  top = (height - crop) // 2
  expected = full[top:top + crop]
  cropped = mri_pipeline.readout_crop(k, crop)
  got = mri_pipeline.ifft2c(cropped * column_mask[None, :].astype(np.float32))
  np.testing.assert_allclose(got, expected, atol=2e-5)


def test_make_example_scales_linearly_and_keeps_measurements():
  rng = np.random.default_rng(2)
  k = _complex(rng, (8, 8))
  mask = np.zeros((8, 8), np.float32)
  mask[:, [0, 3, 4, 6]] = 1
  ex = mri_pipeline.make_example(k, mask)
  s = ex["scale"]
  x = mri_pipeline.from_channels(ex["x"])
  assert np.isclose(np.abs(x).max(), 1.0, atol=1e-6)
  k0 = mri_pipeline.from_channels(ex["k0"])
  np.testing.assert_allclose(k0, s * k * mask, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mri_pipeline.from_channels(ex["target"]),
                             s * mri_pipeline.ifft2c(k), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(x, mri_pipeline.ifft2c(s * k * mask), rtol=1e-4, atol=1e-5)


def test_volume_masks_are_reproducible_per_file():
  a = mri_pipeline.volume_mask("random", (8, 64), 4, None, "file1.h5")
  b = mri_pipeline.volume_mask("random", (8, 64), 4, None, "file1.h5")
  c = mri_pipeline.volume_mask("random", (8, 64), 4, None, "file2.h5")
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_two_dimensional_masks_refuse_oversampled_readout():
  with pytest.raises(ValueError, match="column masks"):
    mri_pipeline.check_mask_kind("variable_density_2d", 32, 16, "f.h5")
  mri_pipeline.check_mask_kind("variable_density_2d", 16, 16, "f.h5")
