"""fastMRI single-coil HDF5: tiny files written here, read back lazily; crops checked with NumPy."""
import h5py
import numpy as np
import pytest

from ldct_jax.data import fastmri
from ldct_jax.errors import InputError
from ldct_jax.physics import mri
from conftest import np_fft2c, np_ifft2c


def volume(rng, slices, height, width):
  return (rng.standard_normal((slices, height, width)) +
          1j * rng.standard_normal((slices, height, width))).astype(np.complex64)


def test_oversampled_kspace_round_trip_and_crop(tmp_path):
  """Readout 2x oversampled (as the knee data): image = centre crop of |IFFT|, checked in NumPy."""
  rng = np.random.default_rng(0)
  kspace = volume(rng, 3, 32, 20)
  target = np.abs(np_ifft2c(kspace))[:, 8:24, 2:18].astype(np.float32)  # (16, 16)
  path = fastmri.write_fastmri_file(tmp_path / "file1000001.h5", kspace, target,
                                    attrs={"acquisition": "CORPD_FBK"})
  f = fastmri.FastMRIFile(path)
  assert f.num_slices == 3 and f.kspace_shape == (3, 32, 20)
  assert f.recon_size == (16, 16) and f.encoded_size == (32, 20)
  assert f.target_key == "reconstruction_esc" and f.has_target and f.mask is None
  assert f.attrs["acquisition"] == "CORPD_FBK" and f.attrs["patient_id"] == "file1000001"
  assert f.attrs["max"] == pytest.approx(float(target.max()))
  assert f.attrs["norm"] == pytest.approx(float(np.linalg.norm(target)), rel=1e-6)
  for z in range(3):
    k = f.read_kspace(z)
    assert k.dtype == np.complex64 and k.shape == (32, 20)
    np.testing.assert_array_equal(k, kspace[z])
    np.testing.assert_array_equal(f.read_target(z), target[z])
    image = np.asarray(mri.magnitude_image(k, f.recon_size))
    np.testing.assert_allclose(image, target[z], atol=1e-5)
  # The header alone gives the same size (a file without a target).
  fastmri.write_fastmri_file(tmp_path / "no_target.h5", kspace, None)
  with h5py.File(tmp_path / "no_target.h5", "a") as h:
    del h["ismrmrd_header"]
    h["ismrmrd_header"] = fastmri.ismrmrd_header((32, 20), (16, 16))
  g = fastmri.FastMRIFile(tmp_path / "no_target.h5")
  assert g.recon_size == (16, 16) and not g.has_target and g.read_target(0) is None


def test_reads_are_lazy_and_close_the_file(tmp_path):
  rng = np.random.default_rng(1)
  path = fastmri.write_fastmri_file(tmp_path / "a.h5", volume(rng, 2, 8, 6),
                                    np.ones((2, 8, 6), np.float32))
  f = fastmri.FastMRIFile(path)
  f.read_kspace(1)
  f.read_target(0)
  # No handle stays open: the file can be opened for writing (HDF5 file locking refuses it otherwise).
  with h5py.File(path, "r+") as h:
    assert h["kspace"].chunks == (1, 8, 6)
  assert not any(isinstance(v, np.ndarray) and v.size > 6 for v in vars(f).values())
  with pytest.raises(IndexError, match="slice 2"):
    f.read_kspace(2)


def test_non_square_and_different_sizes_across_files(tmp_path):
  rng = np.random.default_rng(2)
  shapes = {"b.h5": (2, 24, 18), "a.h5": (4, 16, 30), "c.h5": (1, 10, 10)}
  for name, shape in shapes.items():
    k = volume(rng, *shape)
    fastmri.write_fastmri_file(tmp_path / name, k, np.abs(np_ifft2c(k)), recon_key="reconstruction_rss")
  (tmp_path / "notes.txt").write_text("not a file of the dataset")
  paths = fastmri.find_fastmri_files(tmp_path)
  assert [p.name for p in paths] == ["a.h5", "b.h5", "c.h5"]
  for p in paths:
    f = fastmri.FastMRIFile(p)
    assert f.kspace_shape == shapes[p.name] and f.recon_size == shapes[p.name][1:]
    assert f.target_key == "reconstruction_rss"
    np.testing.assert_allclose(np.asarray(mri.magnitude_image(f.read_kspace(0), f.recon_size)),
                               f.read_target(0), atol=1e-5)
  assert fastmri.find_fastmri_files(tmp_path / "b.h5") == [tmp_path / "b.h5"]


def test_file_with_its_own_mask(tmp_path):
  """An undersampled (test-set-like) file: no target, a (W,) mask, k-space zero off it."""
  rng = np.random.default_rng(3)
  full = volume(rng, 2, 16, 12)
  columns = mri.random_columns(12, 4, seed=0)
  kspace = full * columns
  path = fastmri.write_fastmri_file(tmp_path / "test.h5", kspace, None, mask=columns,
                                    attrs={"acceleration": 4})
  f = fastmri.FastMRIFile(path)
  assert not f.has_target and f.mask.dtype == np.float32
  np.testing.assert_array_equal(f.mask, columns.astype(np.float32))
  k = f.read_kspace(1)
  image = np.asarray(mri.magnitude_image(k, f.recon_size, mask=f.mask))
  np.testing.assert_allclose(image, np.abs(np_ifft2c(full[1] * columns)), atol=1e-5)
  with pytest.raises(ValueError, match="one entry per k-space column"):
    fastmri.write_fastmri_file(tmp_path / "bad.h5", kspace, None, mask=columns[:-1])
  assert not (tmp_path / "bad.h5").exists()


def test_clear_errors_naming_the_file(tmp_path):
  (tmp_path / "text.h5").write_text("hello")
  with pytest.raises(InputError, match=r"text\.h5: not an HDF5 file"):
    fastmri.FastMRIFile(tmp_path / "text.h5")
  with pytest.raises(InputError, match=r"text\.h5"):
    fastmri.find_fastmri_files(tmp_path)
  (tmp_path / "text.h5").unlink()
  with h5py.File(tmp_path / "nokspace.h5", "w") as h:
    h["image"] = np.zeros((2, 4, 4))
  with pytest.raises(InputError, match=r"nokspace\.h5: no 'kspace'"):
    fastmri.FastMRIFile(tmp_path / "nokspace.h5")
  with h5py.File(tmp_path / "multicoil.h5", "w") as h:
    h["kspace"] = np.zeros((2, 4, 8, 8), np.complex64)
  with pytest.raises(InputError, match=r"multicoil\.h5.*multi-coil.*single-coil"):
    fastmri.FastMRIFile(tmp_path / "multicoil.h5")
  with h5py.File(tmp_path / "real.h5", "w") as h:
    h["kspace"] = np.zeros((2, 8, 8), np.float32)
  with pytest.raises(InputError, match=r"real\.h5.*complex"):
    fastmri.FastMRIFile(tmp_path / "real.h5")
  with h5py.File(tmp_path / "badmask.h5", "w") as h:
    h["kspace"] = np.zeros((2, 8, 8), np.complex64)
    h["mask"] = np.ones(5, bool)
  with pytest.raises(InputError, match=r"badmask\.h5.*mask"):
    fastmri.FastMRIFile(tmp_path / "badmask.h5")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(InputError, match="no fastMRI"):
    fastmri.find_fastmri_files(empty)
  with pytest.raises(InputError, match="no such"):
    fastmri.find_fastmri_files(tmp_path / "missing")


def test_header_larger_than_kspace_is_clipped(tmp_path):
  """fastMRI's FLAIR guard: a reconSpace larger than the data crops to the data's size."""
  rng = np.random.default_rng(4)
  path = tmp_path / "flair.h5"
  fastmri.write_fastmri_file(path, volume(rng, 1, 12, 10), None)
  with h5py.File(path, "a") as h:
    del h["ismrmrd_header"]
    h["ismrmrd_header"] = fastmri.ismrmrd_header((12, 10), (16, 16))
  assert fastmri.FastMRIFile(path).recon_size == (12, 10)
