"""The built-in dataset: Mayo layout on disk, read back through the DICOM layer, realistic noise."""
import json

import numpy as np
import pytest
from scipy import ndimage

from ldct_jax.data import builtin, dicom
from ldct_jax.data.datasets import load_dataset
from ldct_jax.windows import apply_window

TINY = builtin.BuiltinSpec(num_patients=6, num_slices=3, size=64, seed=5)


def flat_soft_tissue(truth, size):
  """Soft tissue away from edges, where reconstruction error is noise, not blur."""
  local_range = (ndimage.maximum_filter(truth, size=(1, size, size)) -
                 ndimage.minimum_filter(truth, size=(1, size, size)))
  return (np.abs(truth - 50) < 40) & (local_range < 25)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
  return builtin.ensure_builtin_dataset(TINY, tmp_path_factory.mktemp("cache"), verbose=False)


def test_mayo_layout_and_sidecar_files(tiny_root):
  for pid in TINY.patient_ids():
    for dose in ("full_1mm", "quarter_1mm"):
      files = sorted((tiny_root / pid / dose).glob("*.IMA"))
      assert len(files) == TINY.num_slices, (pid, dose)
  meta = json.load(open(tiny_root / "dataset.json"))
  assert meta["layout"] == "mayo" and meta["patients"] == TINY.patient_ids()
  lesions = json.load(open(tiny_root / "lesions.json"))
  assert set(lesions) == set(TINY.patient_ids())
  pairs = dicom.find_pairs(tiny_root)
  assert [p.patient_id for p in pairs] == TINY.patient_ids()
  assert all(p.layout == "mayo" for p in pairs)


def test_cached_dataset_is_reused_not_rewritten(tiny_root, tmp_path_factory):
  stamp = (tiny_root / "dataset.json").stat().st_mtime_ns
  again = builtin.ensure_builtin_dataset(TINY, tiny_root.parent, verbose=False)
  assert again == tiny_root and (tiny_root / "dataset.json").stat().st_mtime_ns == stamp
  assert builtin.BuiltinSpec(seed=6).key() != builtin.BuiltinSpec(seed=5).key()


def test_read_back_matches_ground_truth_order_and_low_dose_is_noisier(tiny_root):
  for pid in TINY.patient_ids()[:2]:
    low, full = dicom.load_pair(next(p for p in dicom.find_pairs(tiny_root) if p.patient_id == pid))
    truth = builtin.load_ground_truth(tiny_root, pid)
    assert low.hu.shape == full.hu.shape == truth.shape
    # Nested doses: low - full is the extra noise of the dose reduction, zero-mean.
    extra = (low.hu - full.hu)[truth > -500]
    assert np.std(extra) > 2.0 and abs(np.mean(extra)) < 0.2 * np.std(extra)
    # Slices come back in the generator's order: each slice best matches its own truth.
    for z in range(truth.shape[0]):
      errors = [np.mean(np.abs(full.hu[z] - truth[k])) for k in range(truth.shape[0])]
      assert int(np.argmin(errors)) == z


def test_load_dataset_splits_by_patient(tiny_root):
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(root=str(tiny_root),
                                      split=dict(file="", fractions=(0.5, 0.25, 0.25), seed=0)))
  ds = load_dataset(cfg)
  assert sorted(sum(ds.splits.values(), [])) == TINY.patient_ids()
  assert all(len(ds.splits[s]) >= 1 for s in ("train", "val", "test"))
  v = ds.split("test")[0]
  assert set(v.arrays) == {"ld", "nd"} and v.arrays["ld"].shape == (3, 64, 64)


def test_default_flux_gives_mayo_like_quarter_dose_gap(tmp_path):
  """Abdomen, 256^2: LD vs ND PSNR in [-160, 240] HU ~27-29 dB (Mayo abdomen: 29.1 dB)."""
  spec = builtin.BuiltinSpec(num_patients=1, num_slices=2, size=256, regions=("abdomen",), seed=1)
  root = builtin.ensure_builtin_dataset(spec, tmp_path, verbose=False)
  low, full = dicom.load_pair(dicom.find_pairs(root)[0])
  mse = np.mean((apply_window(low.hu, "abdomen") - apply_window(full.hu, "abdomen")) ** 2)
  assert 26.0 < 10 * np.log10(1.0 / mse) < 30.5
  # Flat soft tissue, away from edges where FBP blur dominates the error:
  # quarter dose has twice the noise std of full dose.
  truth = builtin.load_ground_truth(root, spec.patient_ids()[0])
  flat = flat_soft_tissue(truth, 7)
  assert flat.sum() > 2000
  ratio = np.std((low.hu - truth)[flat]) / np.std((full.hu - truth)[flat])
  assert 1.7 < ratio < 2.3, ratio


def test_shipped_split_is_stratified_by_region_and_used_by_default(tiny_root):
  import ml_collections
  splits = json.load(open(tiny_root / "splits.json"))
  regions = json.load(open(tiny_root / "lesions.json"))
  for name in ("train", "val", "test"):
    assert {regions[p]["region"] for p in splits[name]} == {"abdomen", "chest"}, name
  ds = load_dataset(ml_collections.ConfigDict(dict(root=str(tiny_root))))
  assert ds.splits["test"] == splits["test"]
  forced = load_dataset(ml_collections.ConfigDict(dict(
      root=str(tiny_root), split=dict(file="", fractions=(0.5, 0.25, 0.25), seed=0))))
  assert sorted(sum(forced.splits.values(), [])) == TINY.patient_ids()
