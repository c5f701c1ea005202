"""Test-wide settings: CPU JAX, quiet logs, one compilation cache for every test run."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("LDCT_JAX_COMPILATION_CACHE",
                      os.path.join(tempfile.gettempdir(), "ldct_jax_test_xla_cache"))


import numpy as np  # noqa: E402
import pytest  # noqa: E402

# One tiny built-in dataset (Mayo-layout DICOM, 3 abdomen + 3 chest patients)
# shared by the end-to-end tests; generated once per test session.
TINY_BUILTIN = dict(num_patients=6, num_slices=4, size=64, seed=2)


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
  """Cache folder holding the tiny built-in dataset (``data.cache_dir``)."""
  from ldct_jax.data import builtin
  cache = tmp_path_factory.mktemp("builtin_cache")
  builtin.ensure_builtin_dataset(builtin.BuiltinSpec(**TINY_BUILTIN), cache, verbose=False)
  return cache


def windowed_psnr(pred_hu, ref_hu, low=-160.0, high=240.0):
  """Independent reference: per-slice PSNR (dB) after clipping HU to [low, high]
  -> [0, 1], data range 1, by scikit-image in float64."""
  from skimage.metrics import peak_signal_noise_ratio
  to_unit = lambda x: np.clip((np.asarray(x, np.float64) - low) / (high - low), 0.0, 1.0)
  return np.array([peak_signal_noise_ratio(to_unit(r), to_unit(p), data_range=1.0)
                   for p, r in zip(pred_hu, ref_hu)])


# NumPy references for the MRI tests: centred orthonormal 2D FFTs over the last
# two axes (complex128 for complex128 input), independent of ldct_jax.physics.mri.
def np_fft2c(x):
  axes = (-2, -1)
  return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho"),
                         axes=axes)


def np_ifft2c(k):
  axes = (-2, -1)
  return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=axes), axes=axes, norm="ortho"),
                         axes=axes)
