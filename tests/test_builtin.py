"""The built-in dataset: Mayo layout on disk, read back through the DICOM layer, realistic noise."""
import filecmp
import json

import jax
import numpy as np
import pytest
from scipy import ndimage

from ldct_jax.data import builtin, dicom
from ldct_jax.data.datasets import load_dataset
from ldct_jax.physics import ct
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


# --- Dose and kernel variants (issue #12) -----------------------------------

VARIANT = dict(num_patients=2, num_slices=2, size=64, seed=3)


def test_default_cache_key_is_pinned():
  """README numbers and users' caches depend on the default dataset's key."""
  assert builtin.BuiltinSpec().key() == "cedf2ce0dfab"
  assert builtin.BuiltinSpec(kernel="ramp", extra_doses=()).key() == "cedf2ce0dfab"
  assert builtin.BuiltinSpec(**VARIANT).key() == "95989fecd449"
  keys = {builtin.BuiltinSpec(**{**VARIANT, **kw}).key() for kw in (
      {}, dict(kernel="hann"), dict(extra_doses=(0.1,)), dict(extra_doses=(0.1, 0.05)),
      dict(dose_fraction=0.1), dict(seed=4))}
  assert len(keys) == 6


def test_spec_rejects_bad_kernel_and_repeated_doses():
  with pytest.raises(ValueError, match="kernel"):
    builtin.BuiltinSpec(kernel="B30f")
  with pytest.raises(ValueError, match="three decimals"):
    builtin.BuiltinSpec(extra_doses=(0.1, 0.1001))
  with pytest.raises(ValueError, match="three decimals"):
    builtin.BuiltinSpec(extra_doses=(0.25,))
  with pytest.raises(ValueError, match=r"\(0, 1\)"):
    builtin.BuiltinSpec(extra_doses=(1.0,))
  assert builtin.BuiltinSpec(extra_doses=[0.1, 0.5]).extra_doses == (0.1, 0.5)
  assert builtin.dose_folder(0.1) == "dose0.100_1mm"


def test_tree_thinning_is_binomial_nested_and_independent_of_the_other_doses():
  """Closed forms for Poisson full-dose counts lam: N(f) has mean and variance
  f lam, N(f1) - N(f2) has (f1 - f2) lam and is uncorrelated with N(f2)."""
  p = np.linspace(0.5, 3.0, 20000).astype(np.float32)
  lam = 1e5 * np.exp(-p.astype(np.float64))
  fractions = (1.0, 0.5, 0.25, 0.1, 0.05)
  key = jax.random.PRNGKey(3)
  for exact in (False, True):
    counts = np.asarray(ct.sample_dose_level_counts(
        p, fractions, key, electronic_noise_std=0.0, exact_counts=exact, thinning="tree"),
        np.float64)
    for level, f in enumerate(fractions):
      z = (counts[level] - f * lam) / np.sqrt(f * lam)
      assert abs(z.mean()) < 0.03 and abs(z.std() - 1.0) < 0.03, (exact, f, z.mean(), z.std())
    for high, low in ((2, 3), (1, 4)):
      if exact:
        assert (counts[high] >= counts[low]).all()
      gap = counts[high] - counts[low] - (fractions[high] - fractions[low]) * lam
      assert abs(gap.std() / np.sqrt((fractions[high] - fractions[low]) * lam).mean() - 1) < 0.1
      assert abs(np.corrcoef(gap, counts[low] - fractions[low] * lam)[0, 1]) < 0.05
    # Each level depends on its own fraction only (electronic noise included).
    alone = np.asarray(ct.sample_dose_level_counts(p, (1.0, 0.1), key, exact_counts=exact,
                                                   thinning="tree"))
    among = np.asarray(ct.sample_dose_level_counts(p, (0.05, 0.1, 1.0, 0.5), key,
                                                   exact_counts=exact, thinning="tree"))
    np.testing.assert_array_equal(alone[1], among[1])
    np.testing.assert_array_equal(alone[0], among[2])
    # The built-in default pair draws what the sequential thinning drew.
    np.testing.assert_array_equal(
        np.asarray(ct.sample_dose_level_counts(p, (1.0, 0.25), key, exact_counts=exact)),
        np.asarray(ct.sample_dose_level_counts(p, (1.0, 0.25), key, exact_counts=exact,
                                               thinning="tree")))
  with pytest.raises(ValueError, match="thinning"):
    ct.sample_dose_level_counts(p, (1.0,), key, thinning="chain")


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
  """Tiny datasets, one seed: the paired dose 0.25 and 0.1, 0.25 with an extra
  0.1 series, a Hann-kernel one, a regeneration and another seed."""
  cache, again = tmp_path_factory.mktemp("variants"), tmp_path_factory.mktemp("again")
  make = lambda cache_dir=cache, **kw: builtin.ensure_builtin_dataset(
      builtin.BuiltinSpec(**{**VARIANT, **kw}), cache_dir, verbose=False)
  return dict(quarter=make(), tenth=make(dose_fraction=0.1),
              extra=make(extra_doses=(0.1, 0.5)), hann=make(kernel="hann"),
              again=make(again), seed4=make(seed=4))


def _series(root, pid, name):
  return dicom.read_series(root / pid / name).hu


def test_doses_share_phantoms_and_ndct_and_differ_only_in_ldct(variants):
  quarter, tenth = variants["quarter"], variants["tenth"]
  for name in ["lesions.json", "splits.json"] + [
      f"ground_truth/{pid}.npy" for pid in builtin.BuiltinSpec(**VARIANT).patient_ids()]:
    assert filecmp.cmp(quarter / name, tenth / name, shallow=False), name
  extra_std = {}
  for root in (quarter, tenth):
    diffs = []
    for pid in builtin.BuiltinSpec(**VARIANT).patient_ids():
      full = _series(root, pid, "full_1mm")
      np.testing.assert_array_equal(full, _series(quarter, pid, "full_1mm"))
      truth = builtin.load_ground_truth(root, pid)
      diffs.append((_series(root, pid, "quarter_1mm") - full)[truth > -500])
    extra_std[root] = np.std(np.concatenate(diffs))
  # Nested doses: Var(LD - ND) ~ 1/f - 1, so the std ratio is sqrt((1/0.1 - 1) /
  # (1/0.25 - 1)) = sqrt(3) = 1.73 (measured 1.72; sqrt(0.25/0.1) = 1.58 would be
  # the ratio of the LD noise alone). 5% covers the slice-to-slice spread (1.5%).
  ratio = extra_std[tenth] / extra_std[quarter]
  assert abs(ratio / np.sqrt(3.0) - 1.0) < 0.05, ratio


def test_extra_dose_series_equal_the_single_dose_datasets_and_change_nothing_else(variants):
  quarter, tenth, extra = variants["quarter"], variants["tenth"], variants["extra"]
  pairs = dicom.find_pairs(extra)
  assert [(p.low_dose_dir.name, p.full_dose_dir.name) for p in pairs] == [
      ("quarter_1mm", "full_1mm")] * 2
  meta = json.load(open(extra / "dataset.json"))
  assert meta["doses"] == {"full_1mm": 1.0, "quarter_1mm": 0.25,
                           "dose0.100_1mm": 0.1, "dose0.500_1mm": 0.5}
  assert meta["kernel"] == "ramp" and meta["spec"]["extra_doses"] == [0.1, 0.5]
  for pid in builtin.BuiltinSpec(**VARIANT).patient_ids():
    for name in ("full_1mm", "quarter_1mm"):  # extras (one above 0.25) change nothing
      np.testing.assert_array_equal(_series(extra, pid, name), _series(quarter, pid, name))
    doses = builtin.load_extra_doses(extra, pid)
    assert sorted(doses) == [0.1, 0.5] and doses[0.1].dtype == np.float32
    np.testing.assert_array_equal(doses[0.1], _series(tenth, pid, "quarter_1mm"))
    # Dose 0.5 lies between full and quarter dose in noise.
    full, low = _series(extra, pid, "full_1mm"), _series(extra, pid, "quarter_1mm")
    body = builtin.load_ground_truth(extra, pid) > -500
    assert np.std((doses[0.5] - full)[body]) < np.std((low - full)[body])
    assert builtin.load_extra_doses(quarter, pid) == {}


def test_generation_is_reproducible_by_seed(variants):
  """Same spec: same pixels and side files (the DICOM UIDs are fresh each time)."""
  quarter, again, seed4 = variants["quarter"], variants["again"], variants["seed4"]
  pids = builtin.BuiltinSpec(**VARIANT).patient_ids()
  for name in ["lesions.json", "splits.json"] + [f"ground_truth/{pid}.npy" for pid in pids]:
    assert filecmp.cmp(quarter / name, again / name, shallow=False), name
  for pid in pids:
    for name in ("full_1mm", "quarter_1mm"):
      np.testing.assert_array_equal(_series(quarter, pid, name), _series(again, pid, name))
      assert not np.array_equal(_series(quarter, pid, name), _series(seed4, pid, name))
    assert not np.array_equal(builtin.load_ground_truth(quarter, pid),
                              builtin.load_ground_truth(seed4, pid))


def test_smooth_kernel_lowers_high_frequency_noise(variants):
  quarter, hann = variants["quarter"], variants["hann"]
  assert json.load(open(hann / "dataset.json"))["kernel"] == "hann"
  assert dicom.read_series(hann / "SIM001" / "full_1mm").headers[0].ConvolutionKernel == "hann"
  high_pass = {}
  for root in (quarter, hann):
    parts = []
    for pid in builtin.BuiltinSpec(**VARIANT).patient_ids():
      diff = _series(root, pid, "quarter_1mm") - _series(root, pid, "full_1mm")
      detail = diff - ndimage.gaussian_filter(diff, (0, 1, 1))
      parts.append(detail[builtin.load_ground_truth(root, pid) > -500])
    high_pass[root] = np.std(np.concatenate(parts))
  # Same photons, Hann apodisation: measured 3.5 vs 13.3 HU at 64^2.
  assert high_pass[hann] < 0.5 * high_pass[quarter], high_pass
