"""Built-in MRI data: fastMRI files read back through the reader, noise and target vs closed forms,
split by subject, reproducible, MNI152 slices equal to the template's."""
import json

import numpy as np
import pytest
from scipy import ndimage

from ldct_jax.data import builtin_mri, fastmri
from ldct_jax.physics import mri

TINY = builtin_mri.BuiltinMRISpec(num_phantoms=4, slices_per_subject=3, size=32, noise_level=0.02,
                                  readout_oversampling=2, seed=3)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
  return builtin_mri.ensure_builtin_mri(TINY, tmp_path_factory.mktemp("cache"), verbose=False)


def test_layout_and_read_back_through_the_fastmri_reader(tiny_root):
  meta = json.load(open(tiny_root / "dataset.json"))
  assert sorted(meta["subjects"]) == TINY.subject_ids() == [
      "mni152", "phantom001", "phantom002", "phantom003", "phantom004"]
  paths = fastmri.find_fastmri_files(tiny_root)
  assert [p.stem for p in paths] == TINY.subject_ids()
  for path in paths:
    f = fastmri.FastMRIFile(path)
    # 2x readout oversampling: 64 k-space rows for a 32-row image, as the knee data.
    assert f.kspace_shape == (3, 64, 32) and f.recon_size == (32, 32)
    assert f.target_key == "reconstruction_esc" and f.mask is None
    assert f.attrs["patient_id"] == path.stem
    assert f.attrs["contrast"] == TINY.contrast(path.stem)
    for z in range(3):
      # fastMRI's target: |IFFT| of the fully sampled k-space, centre-cropped.
      np.testing.assert_allclose(np.asarray(mri.magnitude_image(f.read_kspace(z), f.recon_size)),
                                 f.read_target(z), atol=1e-5)
  splits = json.load(open(tiny_root / "splits.json"))
  assert "mni152" in splits["test"]


def test_noise_level_and_target_against_closed_forms(tiny_root):
  """Pure-noise rows (the readout padding) have E|n|^2 = sigma^2; at high SNR the target's
  error against the noise-free magnitude is the in-phase noise component, std sigma / sqrt(2)."""
  sigma = TINY.noise_level
  noise_power, errors = [], []
  for subject in TINY.subject_ids():
    f = fastmri.FastMRIFile(tiny_root / f"{subject}.h5")
    truth = builtin_mri.load_ground_truth(tiny_root, subject)
    assert truth.shape == (3, 32, 32) and truth.max() == pytest.approx(1.0)
    for z in range(3):
      image = np.abs(np.asarray(mri.ifft2c(f.read_kspace(z)), np.complex128))
      noise_power.append(np.concatenate([image[:16], image[-16:]]) ** 2)
      bright = truth[z] > 0.3
      errors.append((f.read_target(z) - truth[z])[bright])
  noise_power = np.concatenate([n.ravel() for n in noise_power])
  assert np.mean(noise_power) == pytest.approx(sigma ** 2, rel=0.06)  # 15k samples: ~1% std
  errors = np.concatenate(errors)
  assert np.std(errors) == pytest.approx(sigma / np.sqrt(2), rel=0.1)
  assert abs(np.mean(errors)) < 0.1 * sigma


def test_reproducible_and_subjects_independent_of_each_other(tiny_root, tmp_path):
  again = builtin_mri.ensure_builtin_mri(TINY, tmp_path / "again", verbose=False)
  no_mni = builtin_mri.BuiltinMRISpec(**{**TINY.__dict__, "include_mni": False})
  assert no_mni.key() != TINY.key()
  other = builtin_mri.ensure_builtin_mri(no_mni, tmp_path / "other", verbose=False)
  for subject in ("phantom001", "phantom004"):
    k = fastmri.FastMRIFile(tiny_root / f"{subject}.h5").read_kspace(1)
    np.testing.assert_array_equal(fastmri.FastMRIFile(again / f"{subject}.h5").read_kspace(1), k)
    np.testing.assert_array_equal(fastmri.FastMRIFile(other / f"{subject}.h5").read_kspace(1), k)
  assert not (other / "mni152.h5").exists()
  # The cache is reused, not rewritten.
  stamp = (tiny_root / "dataset.json").stat().st_mtime_ns
  assert builtin_mri.ensure_builtin_mri(TINY, tiny_root.parent, verbose=False) == tiny_root
  assert (tiny_root / "dataset.json").stat().st_mtime_ns == stamp
  assert builtin_mri.BuiltinMRISpec(seed=1).key() != builtin_mri.BuiltinMRISpec(seed=2).key()


def test_default_split_is_by_subject_and_every_split_sees_every_contrast():
  spec = builtin_mri.BuiltinMRISpec()
  splits = builtin_mri.subject_split(spec)
  assert [len(splits[k]) for k in ("train", "val", "test")] == [9, 3, 4]
  assert "mni152" in splits["test"]
  everyone = sum(splits.values(), [])
  assert sorted(everyone) == sorted(spec.subject_ids())  # disjoint and complete
  for name, ids in splits.items():
    assert {spec.contrast(s) for s in ids if s != "mni152"} == {"T1", "T2", "PD"}, name


def test_mni_slices_are_the_templates_at_native_size(tmp_path):
  nibabel = pytest.importorskip("nibabel")
  spec = builtin_mri.BuiltinMRISpec(num_phantoms=1, slices_per_subject=2, size=0, noise_level=0.0)
  root = builtin_mri.ensure_builtin_mri(spec, tmp_path, verbose=False)
  meta = json.load(open(root / "dataset.json"))
  indices = meta["mni_slice_indices"]
  template = np.asarray(nibabel.load(str(builtin_mri.mni_template_path())).dataobj, np.float64)
  assert template.shape == (197, 233, 189) and len(indices) == 2
  truth = builtin_mri.load_ground_truth(root, "mni152")
  f = fastmri.FastMRIFile(root / "mni152.h5")
  assert f.kspace_shape == (2, 233, 197) and f.recon_size == (233, 197)  # non-square
  # Anterior (+y) at the top; every subject's volume is scaled to a maximum of 1.
  expected = np.stack([template[:, :, z].T[::-1] for z in indices])
  expected /= expected.max()
  np.testing.assert_allclose(truth, expected, atol=1e-6)
  for i in range(2):  # noiseless: the target is the template slice itself
    np.testing.assert_allclose(f.read_target(i), expected[i], atol=1e-5)
  # Phantoms share the grid.
  assert fastmri.FastMRIFile(root / "phantom001.h5").kspace_shape == (2, 233, 197)


@pytest.mark.parametrize("contrast", builtin_mri.CONTRASTS)
def test_phantom_contrasts_order_tissues_as_their_weighting(contrast):
  image, labels = builtin_mri.make_phantom(7, (64, 64), 4, contrast)
  mean = {t: image[labels == builtin_mri.TISSUES.index(t)].mean()
          for t in ("csf", "gray", "white") if (labels == builtin_mri.TISSUES.index(t)).any()}
  if contrast == "T1":
    assert mean["white"] > mean["gray"] > mean["csf"]
  elif contrast == "T2":
    assert mean["csf"] > mean["gray"] > mean["white"]
  else:
    assert mean["csf"] > mean["white"] and mean["gray"] > mean["white"]
  assert image.max() == pytest.approx(1.0)
  # Air stays dark beyond the partial-volume blur (sigma 0.6 px) of the head's edge.
  far_air = ~ndimage.binary_dilation(labels > 0, np.ones((1, 7, 7), bool))
  assert image[far_air].max() < 1e-3
