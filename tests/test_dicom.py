"""Tests for ldct_jax.data.dicom: HU I/O, ordering, validation and layouts.

References are independent of the module under test: slices written by hand
with plain pydicom, HU from pydicom's own modality LUT, and geometry computed
here from the values the test itself chose.
"""
import os
import pathlib
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ldct_jax.data import dicom

RNG_SEED = 0


def _hand_slice(path, stored, *, slope=1, intercept=-1024, position=(0, 0, 0),
                orientation=(1, 0, 0, 0, 1, 0), instance=1, series_uid="1.2.3",
                signed=True, drop=(), preamble=True, **tags):
  """Writes one CT slice with plain pydicom, independent of dicom.write_series."""
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
  ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
  ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds.SOPClassUID = CTImageStorage
  ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
  ds.Modality = "CT"
  ds.PatientID = "HAND"
  ds.SeriesInstanceUID = series_uid
  ds.InstanceNumber = instance
  ds.ImagePositionPatient = list(position)
  ds.ImageOrientationPatient = list(orientation)
  ds.PixelSpacing = [0.5, 0.75]
  ds.SliceThickness = 2.0
  ds.Rows, ds.Columns = stored.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated = ds.BitsStored = 16
  ds.HighBit = 15
  ds.PixelRepresentation = int(signed)
  ds.RescaleSlope = slope
  ds.RescaleIntercept = intercept
  for keyword, value in tags.items():
    setattr(ds, keyword, value)
  for keyword in drop:
    delattr(ds, keyword)
  ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
  if preamble:
    ds.save_as(path, enforce_file_format=True)
  else:
    # Bare dataset, no preamble or file meta (old ACR-NEMA style files).
    del ds.file_meta
    ds.save_as(path, implicit_vr=True, little_endian=True)
  return path


def _volume(shape=(5, 16, 24), low=-1024, high=3071):
  return np.random.default_rng(RNG_SEED).integers(low, high + 1, size=shape)


# ------------------------------------------------------------ round trip


def test_round_trip_is_exact_for_integer_hu(tmp_path):
  hu = _volume().astype(np.float32)
  hu[0, 0, :4] = [-1999, -1024, 0, 31743]  # edges of the stored range
  spacing = (2.5, 0.6, 0.8)
  paths = dicom.write_series(hu, tmp_path / "s", spacing=spacing,
                             patient_id="P7", series_description="test",
                             first_position=(-10.0, 20.0, 30.0))
  series = dicom.read_series(tmp_path / "s")
  assert series.hu.dtype == np.float32
  np.testing.assert_array_equal(series.hu, hu)
  assert series.spacing == pytest.approx(spacing)
  expected_positions = [[-10.0, 20.0, 30.0 + 2.5 * k] for k in range(5)]
  np.testing.assert_allclose(series.positions, expected_positions)
  assert series.files == tuple(paths)
  assert series.meta["PatientID"] == "P7"
  assert series.meta["SeriesDescription"] == "test"
  assert series.meta["Modality"] == "CT"


def test_written_files_are_valid_ct_for_plain_pydicom(tmp_path):
  hu = _volume((3, 16, 16)).astype(np.float32)
  paths = dicom.write_series(hu, tmp_path, spacing=(1, 1, 1))
  datasets = [pydicom.dcmread(p) for p in paths]
  for k, (ds, path) in enumerate(zip(datasets, paths)):
    assert path.read_bytes()[128:132] == b"DICM"
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.pixel_array.dtype == np.int16
    np.testing.assert_array_equal(apply_modality_lut(ds.pixel_array, ds), hu[k])
    assert ds.InstanceNumber == k + 1
    for keyword in ("FrameOfReferenceUID", "StudyDate", "WindowCenter",
                    "WindowWidth", "PatientName", "SpacingBetweenSlices"):
      assert keyword in ds
  assert len({ds.SOPInstanceUID for ds in datasets}) == 3
  assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_write_rounds_to_whole_hu_and_clips_to_int16(tmp_path):
  hu = np.array([[[0.4, 1.6, -2.5, 50000.0, -50000.0, 7.5]]])
  dicom.write_series(hu, tmp_path, spacing=(1, 1, 1), first_position=(0, 0, 0))
  got = dicom.read_series(tmp_path, map_padding=False).hu[0, 0]
  np.testing.assert_array_equal(got, [0, 2, -2, 31743, -33792, 8])


def test_write_rejects_non_finite_hu(tmp_path):
  with pytest.raises(ValueError, match="NaN"):
    dicom.write_series(np.full((1, 4, 4), np.nan), tmp_path, spacing=(1, 1, 1))


def test_extra_tags_are_set_and_protected_tags_refused(tmp_path):
  paths = dicom.write_series(np.zeros((1, 8, 8)), tmp_path / "a", spacing=(1, 1, 1),
                             extra_tags={"ConvolutionKernel": "B30f", "KVP": 100})
  ds = pydicom.dcmread(paths[0])
  assert ds.ConvolutionKernel == "B30f" and float(ds.KVP) == 100
  with pytest.raises(ValueError, match="RescaleIntercept"):
    dicom.write_series(np.zeros((1, 8, 8)), tmp_path / "b", spacing=(1, 1, 1),
                       extra_tags={"RescaleIntercept": 0})
  with pytest.raises(ValueError, match="not a DICOM keyword"):
    dicom.write_series(np.zeros((1, 8, 8)), tmp_path / "c", spacing=(1, 1, 1),
                       extra_tags={"Kernel": "B30f"})


# ------------------------------------------------------------- ordering


def test_slices_sorted_by_position_not_file_name(tmp_path):
  hu = _volume((6, 8, 8)).astype(np.float32)
  paths = dicom.write_series(hu, tmp_path, spacing=(1.5, 1, 1))
  # File names now say the opposite of the slice order.
  for k, path in enumerate(paths):
    path.rename(tmp_path / f"img{len(paths) - k:02d}")
  series = dicom.read_series(tmp_path)
  np.testing.assert_array_equal(series.hu, hu)
  assert [p.name for p in series.files] == [f"img{6 - k:02d}" for k in range(6)]


def test_sort_projects_positions_on_the_slice_normal(tmp_path):
  # Sagittal slices: rows along +y, columns along -z, so the normal
  # row x col = (0,1,0) x (0,0,-1) = (-1, 0, 0): ascending along it is
  # descending x. y/z jitter must not affect the order.
  xs = [10.0, -5.0, 0.0, 5.0]
  for i, x in enumerate(xs):
    _hand_slice(tmp_path / f"f{i}.dcm", np.full((4, 4), i),
                position=(x, 3.0 * i, -2.0 * i), orientation=(0, 1, 0, 0, 0, -1))
  series = dicom.read_series(tmp_path)
  expected_order = sorted(range(4), key=lambda i: -xs[i])
  assert [p.name for p in series.files] == [f"f{i}.dcm" for i in expected_order]
  np.testing.assert_array_equal(series.hu[:, 0, 0], np.array(expected_order) - 1024)
  assert series.spacing[0] == pytest.approx(5.0)


def test_instance_number_orders_slices_without_positions(tmp_path):
  instances = [3, 1, 4, 2]
  for i, n in enumerate(instances):
    _hand_slice(tmp_path / f"f{i}", np.full((4, 4), n), instance=n,
                drop=("ImagePositionPatient",))
  series = dicom.read_series(tmp_path)
  np.testing.assert_array_equal(series.hu[:, 0, 0], np.array([1, 2, 3, 4]) - 1024)
  assert np.isnan(series.positions).all()
  assert series.spacing == pytest.approx((2.0, 0.5, 0.75))  # SliceThickness


# ------------------------------------------------------ rescale, padding


def test_non_default_rescale_slope_and_intercept(tmp_path):
  stored = np.arange(16, dtype=np.uint16).reshape(4, 4) * 300
  path = _hand_slice(tmp_path / "a.dcm", stored, slope=2, intercept=-1000,
                     signed=False)
  series = dicom.read_series(tmp_path)
  np.testing.assert_array_equal(series.hu[0], 2.0 * stored - 1000.0)
  ds = pydicom.dcmread(path)
  np.testing.assert_array_equal(series.hu[0], apply_modality_lut(ds.pixel_array, ds))


def test_rescale_varies_per_slice(tmp_path):
  _hand_slice(tmp_path / "a", np.full((4, 4), 100), position=(0, 0, 0), intercept=-1024)
  _hand_slice(tmp_path / "b", np.full((4, 4), 100), position=(0, 0, 1), intercept=0,
              slope=0.5)
  np.testing.assert_array_equal(dicom.read_series(tmp_path).hu[:, 0, 0], [-924, 50])


def test_padding_value_and_fill_become_air(tmp_path):
  stored = np.array([[-2000, 0, 24, 1024],
                     [-976, -100, 1000, 24]], dtype=np.int16)
  _hand_slice(tmp_path / "a.dcm", stored, PixelPaddingValue=-2000)
  # Stored -2000 is the padding tag (-3024 HU); stored -976 is -2000 HU fill
  # without a tag. Everything else is real data, even below air (-1124 HU).
  np.testing.assert_array_equal(dicom.read_series(tmp_path).hu[0],
                                [[-1000, -1024, -1000, 0], [-1000, -1124, -24, -1000]])
  raw = dicom.read_series(tmp_path, map_padding=False).hu[0]
  np.testing.assert_array_equal(raw, stored.astype(np.float32) - 1024)


def test_padding_range_limit(tmp_path):
  stored = np.array([[0, 5, 10, 11]], dtype=np.uint16)
  _hand_slice(tmp_path / "a.dcm", stored, signed=False, intercept=0,
              PixelPaddingValue=10, PixelPaddingRangeLimit=5)
  np.testing.assert_array_equal(dicom.read_series(tmp_path).hu[0], [[0, -1000, -1000, 11]])


def test_real_ct_slice_from_pydicom(tmp_path):
  from pydicom.data import get_testdata_file
  source = get_testdata_file("CT_small.dcm")
  if source is None:
    pytest.skip("pydicom test file CT_small.dcm not available")
  shutil.copy(source, tmp_path)
  series = dicom.read_series(tmp_path)
  ds = pydicom.dcmread(source)
  np.testing.assert_array_equal(series.hu[0], apply_modality_lut(ds.pixel_array, ds))
  assert series.hu.shape == (1, 128, 128)
  # One axial 5 mm slice: spacing falls back to SpacingBetweenSlices.
  assert series.spacing == pytest.approx((5.0, 0.661468, 0.661468))
  hu = series.hu[0]
  assert hu.min() < -700  # air / lung outside the body
  assert -100 < np.median(hu) < 100  # soft tissue dominates
  assert hu.max() < 3000  # no metal-range values in this slice
  assert series.meta["PatientID"] == "1CT1"
  assert series.meta["ConvolutionKernel"] == "STANDARD"
  assert series.meta["KVP"] == 120.0


# ---------------------------------------------------------- bad inputs


def _series_of(folder, n=3, shape=(4, 4)):
  for i in range(n):
    _hand_slice(folder / f"s{i}.dcm", np.zeros(shape), position=(0, 0, float(i)))


def test_non_dicom_file_named(tmp_path):
  _series_of(tmp_path)
  (tmp_path / "notes.txt").write_text("not an image\n" * 20)
  with pytest.raises(ValueError, match=r"notes\.txt.*not a DICOM"):
    dicom.read_series(tmp_path)
  # Selecting the images with a pattern reads the series.
  assert dicom.read_series(tmp_path, pattern="*.DCM").hu.shape == (3, 4, 4)


def test_preamble_less_dicom_is_read(tmp_path):
  _hand_slice(tmp_path / "bare", np.full((4, 4), 5), preamble=False)
  assert not (tmp_path / "bare").read_bytes()[128:132] == b"DICM"
  np.testing.assert_array_equal(dicom.read_series(tmp_path).hu, np.full((1, 4, 4), -1019))


def test_truncated_file_named(tmp_path):
  _series_of(tmp_path)
  path = tmp_path / "s1.dcm"
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(ValueError, match=r"s1\.dcm.*truncated"):
    dicom.read_series(tmp_path)


def test_mixed_sizes_name_both_files(tmp_path):
  _series_of(tmp_path)
  _hand_slice(tmp_path / "s9.dcm", np.zeros((4, 6)), position=(0, 0, 9))
  with pytest.raises(ValueError, match=r"s0\.dcm.*s9\.dcm"):
    dicom.read_series(tmp_path)


def test_missing_rescale_intercept_on_ct_named(tmp_path):
  _series_of(tmp_path)
  _hand_slice(tmp_path / "s5.dcm", np.zeros((4, 4)), position=(0, 0, 5),
              drop=("RescaleIntercept",))
  with pytest.raises(ValueError, match=r"s5\.dcm.*RescaleIntercept"):
    dicom.read_series(tmp_path)


def test_empty_and_missing_folder(tmp_path):
  with pytest.raises(ValueError, match="no files"):
    dicom.read_series(tmp_path)
  with pytest.raises(ValueError, match="does not exist"):
    dicom.read_series(tmp_path / "nope")


def test_duplicate_positions_name_both_files(tmp_path):
  _series_of(tmp_path)
  _hand_slice(tmp_path / "dup.dcm", np.zeros((4, 4)), position=(0, 0, 1.0004))
  with pytest.raises(ValueError, match=r"duplicate.*(s1\.dcm.*dup\.dcm|dup\.dcm.*s1\.dcm)"):
    dicom.read_series(tmp_path)


def test_missing_slice_is_non_uniform_spacing(tmp_path):
  for i, z in enumerate([0.0, 1.0, 2.0, 4.0, 5.0]):
    _hand_slice(tmp_path / f"s{i}.dcm", np.zeros((4, 4)), position=(0, 0, z))
  with pytest.raises(ValueError, match=r"non-uniform.*s2\.dcm.*s3\.dcm"):
    dicom.read_series(tmp_path)


def test_mixed_series_in_one_folder(tmp_path):
  _series_of(tmp_path)
  _hand_slice(tmp_path / "other.dcm", np.zeros((4, 4)), position=(0, 0, 7),
              series_uid="9.9.9")
  with pytest.raises(ValueError, match=r"different series.*other\.dcm"):
    dicom.read_series(tmp_path)


# -------------------------------------------------------------- writing


def test_refuses_to_overwrite(tmp_path):
  paths = dicom.write_series(np.zeros((2, 4, 4)), tmp_path, spacing=(1, 1, 1))
  before = [p.read_bytes() for p in paths]
  with pytest.raises(FileExistsError, match=str(paths[0])):
    dicom.write_series(np.ones((2, 4, 4)), tmp_path, spacing=(1, 1, 1))
  assert [p.read_bytes() for p in paths] == before
  # Only the second target exists: still nothing is written.
  paths[0].unlink()
  with pytest.raises(FileExistsError, match=str(paths[1])):
    dicom.write_series(np.ones((2, 4, 4)), tmp_path, spacing=(1, 1, 1))
  assert not paths[0].exists()


def test_crash_mid_write_leaves_no_files(tmp_path, monkeypatch):
  original = Dataset.save_as
  calls = []

  def failing_save_as(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise OSError("disk full")
    return original(self, *args, **kwargs)

  monkeypatch.setattr(Dataset, "save_as", failing_save_as)
  with pytest.raises(OSError, match="disk full"):
    dicom.write_series(np.zeros((4, 4, 4)), tmp_path / "out", spacing=(1, 1, 1))
  assert list((tmp_path / "out").iterdir()) == []


def test_template_write_copies_geometry_and_patient_with_new_uids(tmp_path):
  source = tmp_path / "source"
  source.mkdir()
  for i, z in enumerate([40.0, 37.5, 35.0]):  # written in descending z
    _hand_slice(source / f"s{i}.IMA", np.full((6, 8), 10 * i),
                position=(-100.0, -90.0, z), instance=i + 1,
                PatientName="Doe^Jane", StudyInstanceUID="1.2.840.99",
                FrameOfReferenceUID="1.2.840.98", KVP=100, SliceLocation=z)
  template = dicom.read_series(source)
  denoised = template.hu + 7.0
  with pytest.raises(ValueError, match="source"):
    dicom.write_series(denoised, source, spacing=template.spacing, template=template)
  with pytest.raises(ValueError, match="differs"):
    dicom.write_series(denoised, tmp_path / "x", spacing=(1, 1, 1), template=template)
  dicom.write_series(denoised, tmp_path / "den", spacing=template.spacing,
                     template=template, series_description="denoised")
  derived = dicom.read_series(tmp_path / "den")
  np.testing.assert_array_equal(derived.hu, denoised)
  np.testing.assert_allclose(derived.positions, [[-100, -90, z] for z in (35, 37.5, 40)])
  assert derived.spacing == pytest.approx((2.5, 0.5, 0.75))
  for keyword in ("PatientID", "PatientName", "StudyInstanceUID",
                  "FrameOfReferenceUID", "KVP"):
    assert derived.meta[keyword] == template.meta[keyword], keyword
  assert derived.meta["SeriesDescription"] == "denoised"
  assert derived.meta["SeriesInstanceUID"] != template.meta["SeriesInstanceUID"]
  for new, old in zip(derived.headers, template.headers):
    assert new.SOPInstanceUID != old.SOPInstanceUID
    assert new.SourceImageSequence[0].ReferencedSOPInstanceUID == old.SOPInstanceUID
    assert float(new.SliceLocation) == float(old.SliceLocation)
  assert "DERIVED" in derived.meta["ImageType"]


# -------------------------------------------------------------- layouts


def _mayo_tree(root, patients=("L096", "L067"), thickness="1mm", shape=(3, 8, 8)):
  for patient in patients:
    for dose, offset in (("full", 0), ("quarter", 50)):
      dicom.write_series(_volume(shape) + offset, root / patient / f"{dose}_{thickness}",
                         spacing=(1, 1, 1), patient_id=patient, extension=".IMA")


def test_mayo_layout_found_and_paired(tmp_path):
  _mayo_tree(tmp_path)
  _mayo_tree(tmp_path, patients=("L067",), thickness="3mm")
  pairs = dicom.find_pairs(tmp_path)
  assert [p.patient_id for p in pairs] == ["L067", "L096"]
  assert pairs[0] == dicom.PatientPair("L067", tmp_path / "L067" / "quarter_1mm",
                                       tmp_path / "L067" / "full_1mm", "mayo")
  low, full = dicom.load_pair(pairs[1])
  np.testing.assert_array_equal(low.hu - full.hu, 50)
  pairs_3mm = dicom.find_pairs(tmp_path, thickness="3mm", layout="mayo")
  assert [(p.patient_id, p.full_dose_dir.name) for p in pairs_3mm] == [("L067", "full_3mm")]


def test_mayo_patient_with_one_dose_rejected(tmp_path):
  _mayo_tree(tmp_path)
  shutil.rmtree(tmp_path / "L067" / "quarter_1mm")
  with pytest.raises(ValueError, match=r"L067.*quarter_1mm"):
    dicom.find_pairs(tmp_path)


def _tcia_series(folder, description, z0=0.0, offset=0, patient="P1", shape=(3, 8, 8)):
  extra = {} if description is None else {"series_description": description}
  dicom.write_series(_volume(shape) + offset, folder, spacing=(1, 1, 1),
                     patient_id=patient, first_position=(0, 0, z0), **extra)


def test_tcia_layout_by_description_and_folder_name(tmp_path):
  # Patient C002: descriptions say the dose, folder names are uninformative.
  study = tmp_path / "C002" / "01-02-2019-NA-CT-12345"
  _tcia_series(study / "1.000000-NA-111", "Full Dose Images", patient="C002")
  _tcia_series(study / "1.000000-NA-222", "QUARTER DOSE", offset=50, patient="C002")
  _tcia_series(study / "2.000000-Localizer-333", "Topogram", patient="C002")
  # Patient C001: no description, the folder names say; two studies.
  for s, z0 in (("01-01-2019-NA-CT-1", 0.0), ("02-01-2019-NA-CT-2", 100.0)):
    _tcia_series(tmp_path / "C001" / s / "1.000000-Full Dose Images-71", None, z0,
                 patient="C001")
    _tcia_series(tmp_path / "C001" / s / "1.000000-Low_Dose_Images-72", None, z0,
                 offset=50, patient="C001")
  pairs = dicom.find_pairs(tmp_path)
  assert [(p.patient_id, p.study, p.layout) for p in pairs] == [
      ("C001", "01-01-2019-NA-CT-1", "tcia"), ("C001", "02-01-2019-NA-CT-2", "tcia"),
      ("C002", "01-02-2019-NA-CT-12345", "tcia")]
  assert pairs[0].low_dose_dir.name == "1.000000-Low_Dose_Images-72"
  assert pairs[2].full_dose_dir.name == "1.000000-NA-111"
  for pair in pairs:
    low, full = dicom.load_pair(pair)
    np.testing.assert_array_equal(low.hu - full.hu, 50)
  assert dicom.load_pair(pairs[1])[0].positions[0, 2] == 100.0


def test_tcia_thickness_filter(tmp_path):
  study = tmp_path / "C001" / "study"
  _tcia_series(study / "full", "Full Dose Images")
  _tcia_series(study / "low", "Low Dose Images")
  with pytest.raises(ValueError, match=r"no 3mm series.*full \(1 mm\)"):
    dicom.find_pairs(tmp_path, thickness="3mm")
  assert len(dicom.find_pairs(tmp_path, thickness=None)) == 1


def test_unknown_layout_explains_expected_layouts(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "readme.txt").write_text("hi")
  with pytest.raises(ValueError, match=r"full_1mm.*Full Dose Images"):
    dicom.find_pairs(tmp_path)


def test_shifted_positions_rejected_naming_both_files(tmp_path):
  study = tmp_path / "C001" / "study"
  _tcia_series(study / "full", "Full Dose Images")
  _tcia_series(study / "low", "Low Dose Images", z0=0.5)
  (pair,) = dicom.find_pairs(tmp_path)
  with pytest.raises(ValueError, match=r"low/0001\.dcm.*full/0001\.dcm"):
    dicom.load_pair(pair)


def test_tiny_position_jitter_is_accepted(tmp_path):
  study = tmp_path / "C001" / "study"
  _tcia_series(study / "full", "Full Dose Images")
  _tcia_series(study / "low", "Low Dose Images", z0=5e-4)
  (pair,) = dicom.find_pairs(tmp_path)
  assert dicom.load_pair(pair)[0].hu.shape == (3, 8, 8)


def test_different_shapes_rejected_naming_both_files(tmp_path):
  study = tmp_path / "C001" / "study"
  _tcia_series(study / "full", "Full Dose Images")
  _tcia_series(study / "low", "Low Dose Images", shape=(3, 8, 16))
  (pair,) = dicom.find_pairs(tmp_path)
  with pytest.raises(ValueError, match=r"low/0001\.dcm.*full/0001\.dcm"):
    dicom.load_pair(pair)


def test_different_slice_counts_rejected(tmp_path):
  study = tmp_path / "C001" / "study"
  _tcia_series(study / "full", "Full Dose Images", shape=(4, 8, 8))
  _tcia_series(study / "low", "Low Dose Images")
  (pair,) = dicom.find_pairs(tmp_path)
  with pytest.raises(ValueError, match=r"full/0004\.dcm.*low/0003\.dcm"):
    dicom.load_pair(pair)


def test_tcia_patient_with_two_studies_gives_two_scans_in_one_split(tmp_path):
  # A repeat scan: patient C001 has two studies whose series lie at the SAME
  # table positions but differ in content and slice count. Each study must be
  # read as its own LD/ND pair (a reader that gathered a patient's slices
  # across studies would see duplicate positions or mix the two volumes), and
  # both scans must land in the patient's one split.
  from ldct_jax.config import base_config
  from ldct_jax.data import datasets

  studies = {"01-01-2019-NA-CT-1": (3, 0), "06-01-2019-NA-CT-2": (4, 700)}
  for study, (depth, content) in studies.items():
    for dose, ld_offset in (("Full Dose Images", 0), ("Low Dose Images", 50)):
      _tcia_series(tmp_path / "C001" / study / f"1.000000-{dose}-7",
                   dose, offset=content + ld_offset, patient="C001", shape=(depth, 8, 8))
  for patient in ("C002", "C003", "C004"):
    _tcia_series(tmp_path / patient / "study" / "full", "Full Dose Images", patient=patient)
    _tcia_series(tmp_path / patient / "study" / "low", "Low Dose Images", offset=50,
                 patient=patient)

  pairs = [p for p in dicom.find_pairs(tmp_path) if p.patient_id == "C001"]
  assert [p.study for p in pairs] == sorted(studies)
  for pair in pairs:
    study = tmp_path / "C001" / pair.study
    assert pair.low_dose_dir.parent == study and pair.full_dose_dir.parent == study
    depth, content = studies[pair.study]
    low, full = dicom.load_pair(pair)
    assert all(pathlib.Path(f).parent == pair.full_dose_dir for f in full.files)
    np.testing.assert_array_equal(full.hu, _volume((depth, 8, 8)) + content)
    np.testing.assert_array_equal(low.hu - full.hu, 50)

  data_cfg = base_config().data
  data_cfg.root = str(tmp_path)
  data_cfg.split.file = ""
  for seed in range(4):  # C001 lands in different splits; its scans never part
    data_cfg.split.seed = seed
    dataset = datasets.load_dataset(data_cfg)
    scans = {f"C001_{s}" for s in studies}
    assert set(dataset.volumes) == scans | {"C002", "C003", "C004"}
    assert sorted(sum(dataset.splits.values(), [])) == ["C001", "C002", "C003", "C004"]
    (home,) = [name for name, ids in dataset.splits.items() if "C001" in ids]
    assert {v.patient_id for v in dataset.split(home)} >= scans
    for name in set(dataset.splits) - {home}:
      assert not scans & {v.patient_id for v in dataset.split(name)}
    for scan in scans:
      depth, content = studies[scan[len("C001_"):]]
      np.testing.assert_array_equal(dataset.volumes[scan].arrays["nd"],
                                    _volume((depth, 8, 8)) + content)
