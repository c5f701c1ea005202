"""Tests for reading one dose without a partner: dicom.find_series, load_unpaired,
and load_dataset on an NDCT-only tree.

Trees are written with dicom.write_series from volumes the test chose, so the
expected HU are known exactly (write/read round trip of whole HU is exact,
tests/test_dicom.py checks it against plain pydicom).
"""
import pathlib

import ml_collections
import numpy as np
import pydicom
import pytest

from ldct_jax.data import datasets, dicom
from ldct_jax.errors import InputError

SHAPE = (2, 16, 16)


def _hu(seed, shape=SHAPE):
  return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.float32)


def _write(folder, seed, patient="P", description="", shape=SHAPE):
  dicom.write_series(_hu(seed, shape), folder, spacing=(1, 0.5, 0.5), patient_id=patient,
                     series_description=description)


def _mayo(root, patients, doses=("quarter", "full"), thickness="1mm"):
  for i, patient in enumerate(patients):
    for dose in doses:
      dicom.write_series(_hu(10 * i + (dose == "full")),
                         root / patient / f"{dose}_{thickness}", spacing=(1, 0.5, 0.5),
                         patient_id=patient, extension=".IMA")


def _tcia(root, patients, doses=("Low Dose Images", "Full Dose Images")):
  for i, patient in enumerate(patients):
    for dose in doses:
      _write(root / patient / "study-1" / f"1.000000-{dose.replace(' ', '_')}-7",
             10 * i + dose.startswith("Full"), patient=patient, description=dose)


# ------------------------------------------------------------- find_series


@pytest.mark.parametrize("dose", ["low", "full"])
def test_mayo_one_dose_trees(tmp_path, dose):
  folder = {"low": "quarter", "full": "full"}[dose]
  _mayo(tmp_path, ["L2", "L1"], doses=(folder,))
  refs = dicom.find_series(tmp_path, dose=dose)
  assert refs == [dicom.SeriesRef(p, "", tmp_path / p / f"{folder}_1mm", "mayo")
                  for p in ("L1", "L2")]
  other = {"low": "full", "full": "low"}[dose]
  with pytest.raises(dicom.NoSeriesError,
                     match=rf"no {other}-dose series under .*found only {dose}-dose series"):
    dicom.find_series(tmp_path, dose=other)


def test_mayo_patients_may_hold_one_dose_each(tmp_path):
  _mayo(tmp_path, ["L1"], doses=("quarter",))
  _mayo(tmp_path, ["L2"], doses=("full",))
  _mayo(tmp_path, ["L3"])
  assert [r.patient_id for r in dicom.find_series(tmp_path, dose="low")] == ["L1", "L3"]
  assert [r.patient_id for r in dicom.find_series(tmp_path, dose="full")] == ["L2", "L3"]


@pytest.mark.parametrize("dose", ["low", "full"])
def test_tcia_one_dose_trees(tmp_path, dose):
  description = {"low": "Low Dose Images", "full": "Full Dose Images"}[dose]
  _tcia(tmp_path, ["C1", "C2"], doses=(description,))
  refs = dicom.find_series(tmp_path, dose=dose)
  assert [(r.patient_id, r.study, r.layout) for r in refs] == [
      ("C1", "study-1", "tcia"), ("C2", "study-1", "tcia")]
  other = {"low": "full", "full": "low"}[dose]
  with pytest.raises(dicom.NoSeriesError, match=rf"found only {dose}-dose series \(2\)"):
    dicom.find_series(tmp_path, dose=other)


def test_tcia_several_series_of_the_dose_in_one_study_rejected(tmp_path):
  _write(tmp_path / "C1" / "s" / "a", 0, description="Low Dose Images")
  _write(tmp_path / "C1" / "s" / "b", 1, description="Quarter Dose")
  with pytest.raises(InputError, match=r"study .*C1/s: several low-dose series: a, b"):
    dicom.find_series(tmp_path, dose="low")


def test_flat_folder_of_series_and_single_series_root(tmp_path):
  _write(tmp_path / "scan_b", 1, patient="PB")
  _write(tmp_path / "scan_a", 0, patient="PA")
  _write(tmp_path / "scan_a2", 2, patient="PA")
  (tmp_path / "README.txt").write_text("my LDCT")  # non-DICOM root files ignored
  refs = dicom.find_series(tmp_path, dose="low")
  assert refs == [dicom.SeriesRef("PA", "scan_a", tmp_path / "scan_a", "flat"),
                  dicom.SeriesRef("PA", "scan_a2", tmp_path / "scan_a2", "flat"),
                  dicom.SeriesRef("PB", "scan_b", tmp_path / "scan_b", "flat")]
  # The same folder is read as full dose when the caller says so.
  assert [r.folder for r in dicom.find_series(tmp_path, dose="full")] == [
      r.folder for r in refs]
  assert dicom.find_series(tmp_path / "scan_b", dose="low") == [
      dicom.SeriesRef("PB", "scan_b", tmp_path / "scan_b", "flat")]


def test_flat_patient_id_falls_back_to_folder_name(tmp_path):
  _write(tmp_path / "scan_x", 0, patient="")  # write_series stores 'ANON'
  for path in sorted((tmp_path / "scan_x").iterdir()):
    ds = pydicom.dcmread(path)
    ds.PatientID = ""
    ds.save_as(path)
  (ref,) = dicom.find_series(tmp_path, dose="low", layout="flat")
  assert ref.patient_id == "scan_x"


def test_flat_mixed_tree_named(tmp_path):
  _write(tmp_path / "site_1", 0)
  _write(tmp_path / "site_2", 1, description="Full Dose Images")
  with pytest.raises(InputError, match=r"series folder .*site_2 is full-dose by its "
                     r"SeriesDescription 'Full Dose Images'.*mixed tree"):
    dicom.find_series(tmp_path, dose="low")
  # Folder names count when the description says nothing.
  _write(tmp_path / "other" / "quarter_dose_scan", 2)
  with pytest.raises(InputError, match=r"quarter_dose_scan is low-dose by its name"):
    dicom.find_series(tmp_path / "other", dose="full")


def test_flat_root_with_files_and_series_folders_is_mixed(tmp_path):
  _write(tmp_path / "scan", 0)
  _write(tmp_path, 1, shape=(1, 16, 16))
  with pytest.raises(InputError, match=r"holds both DICOM files .* and subfolders: mixed"):
    dicom.find_series(tmp_path, dose="low")


def test_flat_thickness_filter_says_what_was_found(tmp_path):
  _write(tmp_path / "scan", 0)  # SliceThickness 1 mm
  with pytest.raises(dicom.NoSeriesError, match=r"other thicknesses: scan \(1 mm\)"):
    dicom.find_series(tmp_path, dose="low", thickness="3mm")
  assert len(dicom.find_series(tmp_path, dose="low", thickness=None)) == 1


def test_empty_root_and_missing_root(tmp_path):
  with pytest.raises(InputError, match=rf"dataset root {tmp_path} is empty"):
    dicom.find_series(tmp_path, dose="low")
  with pytest.raises(InputError, match=r"does not exist"):
    dicom.find_series(tmp_path / "nope", dose="low")
  with pytest.raises(InputError, match=r"dose must be 'low' or 'full'"):
    dicom.find_series(tmp_path, dose="quarter")


def test_patient_folder_without_dicom_files_named(tmp_path):
  _mayo(tmp_path, ["L1"], doses=("quarter",))
  (tmp_path / "L2").mkdir()
  with pytest.raises(InputError, match=r"patient folder .*L2 holds no DICOM files"):
    dicom.find_series(tmp_path, dose="low")
  (tmp_path / "L2" / "scan").mkdir()
  with pytest.raises(InputError, match=r"L2 has no full_\*/quarter_\* folders.*mixed layouts"):
    dicom.find_series(tmp_path, dose="low")


def test_sidecar_folders_of_non_dicom_files_are_skipped(tmp_path):
  # The built-in data keeps ground_truth/<patient>.npy beside its patients.
  _mayo(tmp_path, ["L1"], doses=("quarter",))
  (tmp_path / "ground_truth").mkdir()
  np.save(tmp_path / "ground_truth" / "L1.npy", np.zeros(3))
  (tmp_path / "splits.json").write_text("{}")
  assert [r.patient_id for r in dicom.find_series(tmp_path, dose="low")] == ["L1"]
  # ...but a folder of DICOM files in the wrong place is a mixed layout.
  _write(tmp_path / "L2", 0)
  with pytest.raises(InputError, match=r"L2 has no full_\*/quarter_\* folders"):
    dicom.find_series(tmp_path, dose="low")


def test_tcia_patient_without_series_named(tmp_path):
  _tcia(tmp_path, ["C1"], doses=("Low Dose Images",))
  (tmp_path / "C2" / "study").mkdir(parents=True)
  with pytest.raises(InputError, match=r"patient folder .*C2 holds no DICOM series"):
    dicom.find_series(tmp_path, dose="low")


def test_flat_series_folder_without_files_named(tmp_path):
  _write(tmp_path / "scan", 0)
  (tmp_path / "empty").mkdir()
  with pytest.raises(InputError, match=r"series folder .*empty holds no DICOM files"):
    dicom.find_series(tmp_path, dose="low", layout="flat")


# ---------------------------------------------------- the other dose unread


def _spy_reads(monkeypatch):
  """Records every file the reader opens, header or pixels."""
  opened = []
  real = dicom._dcmread

  def spy(path, **kwargs):
    opened.append(pathlib.Path(path))
    return real(path, **kwargs)

  monkeypatch.setattr(dicom, "_dcmread", spy)
  return opened


def test_full_dose_files_never_read_for_low_dose_mayo(tmp_path, monkeypatch):
  _mayo(tmp_path, ["L1", "L2"])
  garbage = sorted((tmp_path / "L1" / "full_1mm").iterdir())
  for path in sorted(tmp_path.glob("*/full_1mm/*")):
    path.write_bytes(b"not a DICOM file, and not to be read")
  opened = _spy_reads(monkeypatch)
  data = datasets.load_unpaired(tmp_path, dose="low")
  assert opened and all(p.parent.name == "quarter_1mm" for p in opened)
  assert sorted(data.volumes) == ["L1", "L2"]
  np.testing.assert_array_equal(data.volumes["L2"].arrays["ld"], _hu(10))
  with pytest.raises(InputError, match=rf"{garbage[0]}: not a DICOM file"):
    datasets.load_unpaired(tmp_path, dose="full")


def test_full_dose_pixels_never_read_for_low_dose_tcia(tmp_path, monkeypatch):
  # TCIA tells the dose from the header, so the full-dose series' first
  # header is read, but no full-dose pixel data.
  _tcia(tmp_path, ["C1"])
  read_pixels = []
  real = dicom._read_slice
  monkeypatch.setattr(dicom, "_read_slice",
                      lambda path, *a: read_pixels.append(path) or real(path, *a))
  data = datasets.load_unpaired(tmp_path, dose="low")
  assert read_pixels and all("Low_Dose" in p.parent.name for p in read_pixels)
  np.testing.assert_array_equal(data.volumes["C1"].arrays["ld"], _hu(0))


# ------------------------------------------------------------ load_unpaired


def test_paired_tree_read_as_low_dose_gives_exact_hu(tmp_path):
  _mayo(tmp_path, ["L1", "L2"])
  data = datasets.load_unpaired(tmp_path, dose="low")
  assert data.dose == "low" and data.layout == "mayo" and data.root == tmp_path
  assert data.splits == {"train": ["L1", "L2"], "val": [], "test": []}
  assert data.patient_of == {"L1": "L1", "L2": "L2"}
  for i, patient in enumerate(["L1", "L2"]):
    assert list(data.volumes[patient].arrays) == ["ld"]
    np.testing.assert_array_equal(data.volumes[patient].arrays["ld"], _hu(10 * i))
    assert data.spacing[patient] == pytest.approx((1, 0.5, 0.5))
  full = datasets.load_unpaired(tmp_path, dose="full", patients=["L2"])
  assert list(full.volumes) == ["L2"] and list(full.volumes["L2"].arrays) == ["nd"]
  np.testing.assert_array_equal(full.volumes["L2"].arrays["nd"], _hu(11))
  assert [v.patient_id for v in full.split("train")] == ["L2"]
  with pytest.raises(InputError, match=r"patients \['L9'\] are not under"):
    datasets.load_unpaired(tmp_path, dose="low", patients=["L9"])


def test_flat_patient_with_several_scans_keyed_by_folder(tmp_path):
  _write(tmp_path / "s1", 0, patient="PA")
  _write(tmp_path / "s2", 1, patient="PA")
  _write(tmp_path / "s3", 2, patient="PB")
  data = datasets.load_unpaired(tmp_path, dose="low")
  assert data.patient_of == {"PA_s1": "PA", "PA_s2": "PA", "PB": "PB"}
  assert data.splits["train"] == ["PA", "PB"] and data.layout == "flat"
  np.testing.assert_array_equal(data.volumes["PA_s2"].arrays["ld"], _hu(1))


def test_load_unpaired_refuses_non_ct(tmp_path):
  dicom.write_series(_hu(0), tmp_path / "mr", spacing=(1, 1, 1),
                     extra_tags={"Modality": "MR"})
  with pytest.raises(InputError, match=r"mr/0001\.dcm: Modality is 'MR'"):
    datasets.load_unpaired(tmp_path, dose="low")


# ---------------------------------------------------- load_dataset, ND only


def _data_cfg(root, **split):
  return ml_collections.ConfigDict(dict(
      root=str(root), split=dict(file="", fractions=(0.5, 0.25, 0.25), seed=0, **split)))


@pytest.mark.parametrize("layout", ["mayo", "tcia", "flat"])
def test_load_dataset_on_full_dose_only_tree(tmp_path, layout):
  patients = ["P1", "P2", "P3", "P4"]
  if layout == "mayo":
    _mayo(tmp_path, patients, doses=("full",))
  elif layout == "tcia":
    _tcia(tmp_path, patients, doses=("Full Dose Images",))
  else:
    for i, patient in enumerate(patients):
      _write(tmp_path / f"series_{i}", 10 * i + 1, patient=patient)
  data = datasets.load_dataset(_data_cfg(tmp_path))
  assert data.dose == "full" and data.layout == layout and not data.is_builtin
  assert sorted(data.volumes) == patients
  assert sorted(sum(data.splits.values(), [])) == patients
  assert [len(data.splits[k]) for k in ("train", "val", "test")] == [2, 1, 1]
  for i, patient in enumerate(patients):
    assert list(data.volumes[patient].arrays) == ["nd"]
    np.testing.assert_array_equal(data.volumes[patient].arrays["nd"], _hu(10 * i + 1))


def test_load_dataset_keeps_pair_errors_for_half_paired_trees(tmp_path):
  _mayo(tmp_path, ["L1"])
  _mayo(tmp_path, ["L2"], doses=("full",))
  with pytest.raises(InputError, match=r"L2: has .*full_1mm but no quarter_1mm"):
    datasets.load_dataset(_data_cfg(tmp_path))


def test_load_dataset_refuses_low_dose_only_tree(tmp_path):
  _tcia(tmp_path, ["C1"], doses=("Low Dose Images",))
  with pytest.raises(InputError, match=r"has low-dose series .* but no full-dose"):
    datasets.load_dataset(_data_cfg(tmp_path))
  named = tmp_path / "flat"
  _write(named / "ld_scan", 0, description="Low Dose Images")
  with pytest.raises(InputError, match=r"ld_scan is low-dose .* mixed tree"):
    datasets.load_dataset(_data_cfg(named))
