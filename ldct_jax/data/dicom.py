"""CT DICOM series I/O in Hounsfield units, and the Mayo / TCIA LDCT layouts.

Conventions (every function here follows them):

* Intensities are HU (float32): ``HU = stored * RescaleSlope + RescaleIntercept``,
  applied per slice. A CT image without RescaleIntercept or RescaleSlope is an
  error, never a silent ``0``/``1``: for unsigned Siemens/GE data a forgotten
  intercept shifts every value by ~1024 HU and still "looks like" CT.
* Volumes are ``(D, H, W)``: slice, row, column. Slices are sorted by ascending
  position along the slice normal ``n = row_cosines x column_cosines`` (from
  ImageOrientationPatient). For axial images (IOP ``[1,0,0, 0,1,0]``) ``n`` is
  +z of the DICOM patient system (LPS), so slice 0 is the most inferior (feet
  end) slice and the last is the most superior. The writer lays slices out the
  same way, so write -> read keeps the order.
* Spacing is ``(slice_spacing, row_spacing, col_spacing)`` in mm; row/column
  spacing are DICOM PixelSpacing ``[0]``/``[1]`` (distance between rows, then
  between columns). Positions are ImagePositionPatient in mm (LPS).
* Padding (pixels outside the reconstruction field of view) becomes air,
  ``AIR_HU = -1000``: stored values equal to PixelPaddingValue (or inside
  ``[PixelPaddingValue, PixelPaddingRangeLimit]``), and any HU at or below
  ``PADDING_HU_LIMIT = -2000``, the -2000/-3024 HU fill of Siemens and GE data
  when the padding tag is absent. Nothing physical is that low (air is -1000
  HU), so only fill values are touched; leaving them would put a -3000 HU
  disc edge into every loss and metric.

Writing stores int16 pixels with RescaleSlope 1 and RescaleIntercept -1024
(HU rounded half-to-even to whole HU, clipped to the int16 range
``[-33792, 31743]`` HU), as Explicit VR Little Endian CT Image Storage files.
Writes never overwrite: every target is checked first, files are written under
hidden temporary names and only hard-linked to their final names once all are
complete, so a crash never leaves a half-written file under a final name.

Dataset trees come in three layouts. ``find_pairs`` pairs low- and
full-dose series in the Mayo 2016 (``<root>/<patient>/quarter_1mm`` +
``full_1mm``) and TCIA (``<root>/<patient>/<study>/<series>``, dose from
SeriesDescription or folder name) layouts. ``find_series`` finds one dose
with no partner required (a site's low-dose scans, or full-dose scans
only), in those two layouts or a third, ``'flat'``: a folder whose
subfolders are each one series, or a single series folder. A flat folder's
names cannot tell the dose in general, so the caller says which dose it
holds; a series named as the other dose is an error (a mixed tree). Only
the requested dose's series are read for pixels.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import os
import pathlib
import re
import uuid
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.datadict import tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.uid import (CTImageStorage, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         PYDICOM_IMPLEMENTATION_UID, generate_uid)
from pydicom.valuerep import IS, DSfloat

from ldct_jax.errors import InputError
from ldct_jax.windows import WindowLike, get_window

AIR_HU = -1000.0
PADDING_HU_LIMIT = -2000.0
# Slice positions closer than this (mm) are the same slice, both for duplicate
# detection within a series and for LD/ND pairing. Scanners write positions
# with ~1e-4..1e-6 mm precision; real slice gaps are >= ~0.5 mm.
POSITION_TOL_MM = 1e-3
# Adjacent slice gaps may differ from the median gap by this fraction before a
# series counts as non-uniform (a missing slice gives 100 %).
SPACING_RTOL = 1e-2
# Stored pixel = HU - WRITE_INTERCEPT: air (-1000 HU) is stored as 24, so the
# full clinical range fits int16 with room to spare.
WRITE_INTERCEPT = -1024.0
_INT16_MIN, _INT16_MAX = np.iinfo(np.int16).min, np.iinfo(np.int16).max
# (implicit VR, little endian) as pydicom reports it -> transfer syntax.
_TRANSFER_SYNTAX_OF_ENCODING = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}

# Series-level tags copied into CTSeries.meta when present (first slice).
META_KEYWORDS = (
    "PatientID", "PatientName", "PatientSex", "PatientAge", "PatientBirthDate",
    "StudyInstanceUID", "StudyID", "StudyDate", "StudyTime", "StudyDescription",
    "AccessionNumber", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
    "FrameOfReferenceUID", "SOPClassUID", "Modality", "Manufacturer",
    "ManufacturerModelName", "BodyPartExamined", "PatientPosition", "KVP",
    "XRayTubeCurrent", "ExposureTime", "Exposure", "CTDIvol", "SliceThickness",
    "SpacingBetweenSlices", "ConvolutionKernel", "ReconstructionDiameter",
    "ImageType",
)

# Tags a template-derived series inherits: the same patient, study, frame of
# reference and acquisition (a denoised image still comes from that scan).
_TEMPLATE_SERIES_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "PatientWeight", "PatientSize", "StudyInstanceUID", "StudyID", "StudyDate",
    "StudyTime", "StudyDescription", "AccessionNumber", "ReferringPhysicianName",
    "FrameOfReferenceUID", "PositionReferenceIndicator", "Manufacturer",
    "ManufacturerModelName", "BodyPartExamined", "PatientPosition", "KVP",
    "XRayTubeCurrent", "ExposureTime", "Exposure", "CTDIvol",
    "ConvolutionKernel", "ReconstructionDiameter", "AcquisitionNumber",
)
# Per-slice geometry a template-derived series inherits slice by slice.
_TEMPLATE_SLICE_KEYWORDS = (
    "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation",
    "PixelSpacing", "SliceThickness",
)
# Tags extra_tags may not set: they define how pixels decode to HU, where
# they lie, or which object this is; overriding them would corrupt the series.
_PROTECTED_KEYWORDS = frozenset((
    "PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
    "RescaleIntercept", "RescaleSlope", "PixelPaddingValue", "SOPClassUID",
    "SOPInstanceUID", "SeriesInstanceUID", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "SpacingBetweenSlices",
    "InstanceNumber", "NumberOfFrames",
))


@dataclasses.dataclass(eq=False)
class CTSeries:
  """One CT series as a HU volume with its geometry.

  Attributes:
    hu: ``(D, H, W)`` float32 HU, slices sorted by ascending position along
      the slice normal (axial: inferior -> superior); see the module docstring.
    spacing: ``(slice_spacing, row_spacing, col_spacing)`` in mm.
    positions: ``(D, 3)`` float64 ImagePositionPatient per slice in mm (LPS);
      all NaN when the files carry no positions (then sorted by
      InstanceNumber).
    files: source files in slice order.
    meta: series-level tags present on the first slice (``META_KEYWORDS``)
      as plain Python values (str, int, float, list).
    headers: per-slice datasets without PixelData, in slice order; what
      ``write_series(template=...)`` copies patient/study tags and geometry
      from. Empty for series not read from files.
  """

  hu: np.ndarray
  spacing: tuple
  positions: np.ndarray
  files: tuple
  meta: dict
  headers: tuple = ()

  @property
  def source_dirs(self) -> frozenset:
    """Resolved folders the slices were read from."""
    return frozenset(pathlib.Path(f).resolve().parent for f in self.files)


@dataclasses.dataclass(frozen=True)
class PatientPair:
  """A low-dose / normal-dose series pair of one patient (and study).

  Attributes:
    patient_id: patient folder name (e.g. Mayo ``L067``).
    low_dose_dir: folder of the low-dose (quarter-dose) series.
    full_dose_dir: folder of the normal-dose series.
    layout: ``'mayo'`` or ``'tcia'``.
    study: TCIA study folder name (a patient may have several); ``''`` for Mayo.
  """

  patient_id: str
  low_dose_dir: pathlib.Path
  full_dose_dir: pathlib.Path
  layout: str
  study: str = ""


# ---------------------------------------------------------------- reading


@dataclasses.dataclass
class _Slice:
  path: pathlib.Path
  header: Dataset
  hu: np.ndarray
  position: np.ndarray | None
  orientation: np.ndarray | None
  instance_number: int | None


def read_series(folder, *, pattern: str | None = None,
                map_padding: bool = True) -> CTSeries:
  """Reads one single-frame DICOM series folder into a HU volume.

  Every regular, non-hidden file in ``folder`` (not recursive) must be a DICOM
  image of the series: Mayo ``.IMA``, TCIA ``.dcm`` and extension-less files
  are all recognised by content (the ``DICM`` preamble, or a preamble-less
  dataset with pixel data). Hidden files (``.name``) are skipped; they include
  this module's own unfinished temporary files.

  Args:
    folder: the series folder.
    pattern: optional shell pattern on file names (case-insensitive, e.g.
      ``'*.ima'``); files that do not match are ignored.
    map_padding: map padding to ``AIR_HU`` (see module docstring). False keeps
      the rescaled fill values.

  Returns:
    A ``CTSeries``, slices sorted along the slice normal (InstanceNumber when
    any file lacks ImagePositionPatient or ImageOrientationPatient).

  Raises:
    ValueError: naming the file(s) and the problem, for: a missing or empty
      folder, a non-DICOM file, a file without pixel data, truncated pixel
      data, a CT image without RescaleIntercept/RescaleSlope, slices of
      different size, pixel spacing, orientation or series, duplicate slice
      positions (or instance numbers), non-uniform slice spacing, or no way
      to tell the slice spacing.
  """
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise InputError(f"series folder {folder} does not exist or is not a folder")
  paths = _series_files(folder, pattern)
  if not paths:
    what = f" matching {pattern!r}" if pattern else ""
    raise InputError(f"series folder {folder} contains no files{what}")
  slices = [_read_slice(p, map_padding) for p in paths]
  _check_consistent(slices)
  slices, positions = _sort_slices(slices)
  slice_spacing = _slice_spacing(slices, positions)
  pixel_spacing = _pixel_spacing(slices[0])
  return CTSeries(
      hu=np.stack([s.hu for s in slices]),
      spacing=(slice_spacing, pixel_spacing[0], pixel_spacing[1]),
      positions=positions,
      files=tuple(s.path for s in slices),
      meta=_series_meta(slices[0].header),
      headers=tuple(s.header for s in slices),
  )


def _series_files(folder: pathlib.Path, pattern: str | None) -> list:
  paths = []
  for path in sorted(folder.iterdir()):
    if path.name.startswith(".") or not path.is_file():
      continue
    if pattern and not fnmatch.fnmatch(path.name.lower(), pattern.lower()):
      continue
    paths.append(path)
  return paths


def _dcmread(path: pathlib.Path, **kwargs) -> Dataset:
  """dcmread that tells DICOM from other files and reports errors by file."""
  try:
    with open(path, "rb") as f:
      has_preamble = f.read(132)[128:132] == b"DICM"
  except OSError as e:
    raise InputError(f"{path}: cannot open: {e}") from e
  try:
    if has_preamble:
      return pydicom.dcmread(path, **kwargs)
    # Preamble-less (ACR-NEMA style) files exist in old archives; force-read
    # them but accept only a parse that yields an image, since force=True
    # "parses" any byte string into garbage elements.
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      ds = pydicom.dcmread(path, force=True, **kwargs)
      is_image = "Rows" in ds and "Columns" in ds
    if is_image and "TransferSyntaxUID" not in ds.file_meta:
      # Pixel decoding needs a transfer syntax; use the encoding pydicom
      # detected while parsing.
      ds.file_meta.TransferSyntaxUID = _TRANSFER_SYNTAX_OF_ENCODING[
          ds.original_encoding]
  # Any parse failure (pydicom raises many types on corrupt bytes) becomes a
  # ValueError that names the file.
  except Exception as e:
    if has_preamble:
      raise InputError(f"{path}: unreadable DICOM file: {e}") from e
    is_image = False
  if not is_image:
    raise InputError(
        f"{path}: not a DICOM file (no 'DICM' preamble and no DICOM image "
        "dataset); remove it or select files with pattern=")
  return ds


def _is_ct(ds: Dataset) -> bool:
  return ds.get("Modality", "") == "CT" or ds.get("SOPClassUID", "") == CTImageStorage


# Photometric interpretations whose (rescaled) values are HU: MONOCHROME1
# differs from MONOCHROME2 only in display polarity.
_GRAYSCALE = ("MONOCHROME2", "MONOCHROME1")


def check_ct_series(series: CTSeries) -> None:
  """Refuses a series a CT denoiser was not trained on, naming a file and the tag.

  A model trained on CT in HU must not be fed an MR slice (read with slope 1,
  intercept 0 its values are arbitrary units) or a rendered RGB/palette image:
  every slice must have Modality CT (or the CT Image Storage SOP class when
  Modality is absent), a MONOCHROME photometric interpretation, and
  RescaleSlope/RescaleIntercept with a RescaleType, if given, of HU.
  """
  for path, ds in zip(series.files, series.headers):
    modality = str(ds.get("Modality", "") or "")
    if modality and modality != "CT":
      raise InputError(f"{path}: Modality is {modality!r}, not 'CT'; this model was trained "
                       "on CT images in HU and cannot denoise other modalities")
    if not modality and ds.get("SOPClassUID", "") != CTImageStorage:
      raise InputError(f"{path}: no Modality tag and not a CT Image Storage object "
                       f"(SOPClassUID {ds.get('SOPClassUID', '')!s}); refusing to treat it as CT")
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    if photometric not in _GRAYSCALE:
      raise InputError(f"{path}: PhotometricInterpretation {photometric or '(missing)'!r}; a CT "
                       f"denoiser needs grayscale {' or '.join(_GRAYSCALE)} images")
    if ds.get("RescaleSlope") in (None, "") or ds.get("RescaleIntercept") in (None, ""):
      raise InputError(f"{path}: no RescaleSlope/RescaleIntercept; HU cannot be derived")
    rescale_type = str(ds.get("RescaleType", "") or "")
    if rescale_type and rescale_type.upper() != "HU":
      raise InputError(f"{path}: RescaleType is {rescale_type!r}, not 'HU'; the model "
                       "expects Hounsfield units")


def _read_slice(path: pathlib.Path, map_padding: bool) -> _Slice:
  ds = _dcmread(path)
  if "PixelData" not in ds:
    raise InputError(f"{path}: DICOM file without pixel data (not an image, or "
                     "truncated before its pixels)")
  if int(ds.get("NumberOfFrames", 1) or 1) != 1:
    raise InputError(f"{path}: multi-frame images are not supported")
  transfer_syntax = ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
  if not transfer_syntax.is_compressed:
    expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                * int(ds.BitsAllocated) // 8)
    if len(ds.PixelData) < expected:
      raise InputError(
          f"{path}: truncated pixel data: {len(ds.PixelData)} bytes, expected "
          f"{expected} for {ds.Rows}x{ds.Columns} pixels of {ds.BitsAllocated} bits")
  if int(ds.get("SamplesPerPixel", 1)) != 1:
    raise InputError(f"{path}: not a grayscale image (SamplesPerPixel="
                     f"{ds.SamplesPerPixel})")
  try:
    stored = ds.pixel_array
  except Exception as e:  # pydicom raises many types for undecodable pixels
    raise InputError(f"{path}: cannot decode pixel data: {e}") from e

  slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
  if slope is None or intercept is None or slope == "" or intercept == "":
    if _is_ct(ds):
      raise InputError(
          f"{path}: CT image without RescaleIntercept/RescaleSlope; HU cannot "
          "be derived (assuming 0/1 would silently shift every value)")
    slope, intercept = 1.0, 0.0  # non-CT images store their values directly
  hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)

  if map_padding:
    padding = hu <= PADDING_HU_LIMIT
    if "PixelPaddingValue" in ds:
      low = high = int(ds.PixelPaddingValue)
      if "PixelPaddingRangeLimit" in ds:
        low, high = sorted((low, int(ds.PixelPaddingRangeLimit)))
      padding |= (stored >= low) & (stored <= high)
    hu[padding] = AIR_HU

  # Keep the header for template writes, but not its pixels (memory).
  del ds.PixelData
  position = orientation = None
  if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
    position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
  instance = ds.get("InstanceNumber")
  return _Slice(path=path, header=ds, hu=hu, position=position,
                orientation=orientation,
                instance_number=None if instance in (None, "") else int(instance))


def _check_consistent(slices: list) -> None:
  """Raises naming two files that disagree on size, spacing, orientation or series."""
  first = slices[0]
  first_spacing = _pixel_spacing(first)
  for s in slices[1:]:
    if s.hu.shape != first.hu.shape:
      raise InputError(
          f"mixed image sizes in series: {first.path} is {first.hu.shape[0]}x"
          f"{first.hu.shape[1]} but {s.path} is {s.hu.shape[0]}x{s.hu.shape[1]}")
    a, b = (x.header.get("SeriesInstanceUID") for x in (first, s))
    if a and b and a != b:
      raise InputError(f"files of different series in one folder: {first.path} "
                       f"(SeriesInstanceUID {a}) and {s.path} ({b})")
    if not np.allclose(_pixel_spacing(s), first_spacing, atol=1e-4):
      raise InputError(f"mixed PixelSpacing in series: {first.path} has "
                       f"{first_spacing} mm but {s.path} has {_pixel_spacing(s)} mm")
    if (s.orientation is not None and first.orientation is not None
        and not np.allclose(s.orientation, first.orientation, atol=1e-4)):
      raise InputError(
          f"mixed ImageOrientationPatient in series: {first.path} has "
          f"{first.orientation.tolist()} but {s.path} has {s.orientation.tolist()}")


def _pixel_spacing(s: _Slice) -> tuple:
  spacing = s.header.get("PixelSpacing")
  if not spacing or len(spacing) != 2:
    raise InputError(f"{s.path}: missing or malformed PixelSpacing")
  return float(spacing[0]), float(spacing[1])


def _sort_slices(slices: list) -> tuple:
  """Sorts along the slice normal; returns (slices, (D, 3) positions or NaN)."""
  if all(s.position is not None for s in slices):
    iop = slices[0].orientation
    normal = np.cross(iop[:3], iop[3:])
    heights = np.array([s.position @ normal for s in slices])
    order = np.argsort(heights, kind="stable")
    slices = [slices[i] for i in order]
    duplicates = np.flatnonzero(np.diff(heights[order]) <= POSITION_TOL_MM)
    if duplicates.size:
      i = duplicates[0]
      raise InputError(
          f"duplicate slice position {slices[i].position.tolist()} mm: "
          f"{slices[i].path} and {slices[i + 1].path}")
    return slices, np.stack([s.position for s in slices])
  missing = [s.path for s in slices if s.instance_number is None]
  if missing:
    raise InputError(f"{missing[0]}: no ImagePositionPatient/Orientation and "
                     "no InstanceNumber; cannot order the slices")
  slices = sorted(slices, key=lambda s: s.instance_number)
  for a, b in zip(slices, slices[1:]):
    if a.instance_number == b.instance_number:
      raise InputError(f"duplicate InstanceNumber {a.instance_number} (and no "
                       f"slice positions): {a.path} and {b.path}")
  return slices, np.full((len(slices), 3), np.nan)


def _slice_spacing(slices: list, positions: np.ndarray) -> float:
  """Slice gap in mm: from positions, else SpacingBetweenSlices/SliceThickness."""
  if len(slices) > 1 and np.isfinite(positions).all():
    iop = slices[0].orientation
    heights = positions @ np.cross(iop[:3], iop[3:])
    gaps = np.diff(heights)
    median = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - median) > SPACING_RTOL * median)
    if bad.size:
      i = bad[0]
      raise InputError(
          f"non-uniform slice spacing: {gaps[i]:.4f} mm between {slices[i].path} "
          f"and {slices[i + 1].path}, median {median:.4f} mm (missing slice?)")
    return median
  header = slices[0].header
  for keyword in ("SpacingBetweenSlices", "SliceThickness"):
    value = header.get(keyword)
    if value not in (None, "") and float(value) > 0:
      return float(value)
  raise InputError(f"{slices[0].path}: cannot tell the slice spacing: no usable "
                   "positions, SpacingBetweenSlices or SliceThickness")


def _plain(value: Any) -> Any:
  """DICOM element value -> plain Python (str/int/float/list)."""
  if isinstance(value, (list, tuple, MultiValue)):
    return [_plain(v) for v in value]
  if isinstance(value, DSfloat):
    return float(value)
  if isinstance(value, IS):
    return int(value)
  if isinstance(value, (int, float)):
    return value
  return str(value)


def _series_meta(header: Dataset) -> dict:
  return {k: _plain(header.get(k)) for k in META_KEYWORDS
          if header.get(k) not in (None, "")}


# ---------------------------------------------------------------- writing


def write_series(hu, out_dir, *, spacing: Sequence[float],
                 patient_id: str | None = None, series_description: str = "",
                 study_uid: str | None = None, series_number: int = 1,
                 filename_prefix: str = "", extension: str = ".dcm",
                 template: CTSeries | None = None,
                 first_position: Sequence[float] | None = None,
                 extra_tags: Mapping[str, Any] | None = None,
                 window: WindowLike = "abdomen") -> list:
  """Writes a HU volume as a new CT Image Storage series, one file per slice.

  Without a template the series is axial (IOP ``[1,0,0, 0,1,0]``), slice ``k``
  at ``first_position + k * slice_spacing * (0, 0, 1)`` mm, so ``read_series``
  returns the slices in the same order. With a template (a series read from
  files, same shape) the patient, study, frame-of-reference and acquisition
  tags and each slice's geometry are copied from it, with a new
  SeriesInstanceUID and new SOPInstanceUIDs; each slice references its
  source image (SourceImageSequence) and is marked DERIVED.

  Args:
    hu: ``(D, H, W)`` HU volume (finite values). Stored as int16 with
      intercept -1024 and slope 1: rounded to whole HU (half to even) and
      clipped to ``[-33792, 31743]`` HU.
    out_dir: target folder, created if missing; must not be a folder the
      template was read from.
    spacing: ``(slice_spacing, row_spacing, col_spacing)`` in mm; with a
      template it must equal ``template.spacing`` (within 1e-3 mm).
    patient_id: PatientID and PatientName; default the template's, else
      ``'ANON'``. With a template, a different id is an error.
    series_description: SeriesDescription.
    study_uid: StudyInstanceUID; default the template's, else a fresh UID.
    series_number: SeriesNumber.
    filename_prefix: files are named ``{prefix}{k:04d}{extension}``, k from 1
      in slice order (more digits when D > 9999).
    extension: ``''`` or a suffix starting with ``'.'``.
    template: series to take patient/study tags and geometry from.
    first_position: ImagePositionPatient of slice 0 in mm; default
      ``(0, 0, 0)``. Not allowed with a template (its geometry is used).
    extra_tags: ``{keyword: value}`` set on every slice last (e.g.
      ``{'ConvolutionKernel': 'B30f'}``); tags that define pixel decoding,
      geometry or identity are refused.
    window: WindowCenter/WindowWidth stored for viewers.

  Returns:
    The written paths, in slice order.

  Raises:
    ValueError: bad shape, non-finite HU, bad spacing/extension/tags, a
      template mismatch, or out_dir being the template's source folder.
    FileExistsError: naming the path, if any target file already exists;
      then nothing is written.
  """
  hu = np.asarray(hu)
  if hu.ndim != 3 or 0 in hu.shape:
    raise InputError(f"hu must be a non-empty (D, H, W) volume, got shape {hu.shape}"
                     " (use hu[None] for one slice)")
  if not np.isfinite(hu).all():
    raise InputError("hu contains NaN or infinite values; they cannot be stored")
  spacing = tuple(float(s) for s in spacing)
  if len(spacing) != 3 or not all(s > 0 for s in spacing):
    raise InputError(f"spacing must be 3 positive mm values, got {spacing}")
  if extension and not extension.startswith("."):
    raise InputError(f"extension must be '' or start with '.', got {extension!r}")
  extra_tags = dict(extra_tags or {})
  for keyword in extra_tags:
    if tag_for_keyword(keyword) is None:
      raise InputError(f"extra_tags: {keyword!r} is not a DICOM keyword")
    if keyword in _PROTECTED_KEYWORDS:
      raise InputError(f"extra_tags: {keyword!r} is set by write_series itself")

  out_dir = pathlib.Path(out_dir)
  depth, rows, cols = hu.shape
  if template is not None:
    _check_template(template, hu.shape, spacing, out_dir, patient_id,
                    first_position)
  width = max(4, len(str(depth)))
  targets = [out_dir / f"{filename_prefix}{k + 1:0{width}d}{extension}"
             for k in range(depth)]
  for target in targets:
    if os.path.lexists(target):
      raise FileExistsError(f"{target} already exists; write_series never "
                            "overwrites (choose another out_dir or prefix)")

  ds = _base_dataset(rows, cols, spacing, get_window(window))
  if template is not None:
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    for keyword in _TEMPLATE_SERIES_KEYWORDS:
      if keyword in template.headers[0]:
        setattr(ds, keyword, copy.deepcopy(template.headers[0][keyword].value))
  else:
    ds.PatientID = ds.PatientName = patient_id or "ANON"
  if study_uid is not None or template is None:
    ds.StudyInstanceUID = study_uid or generate_uid()
  if template is None:
    ds.FrameOfReferenceUID = generate_uid()
  ds.SeriesInstanceUID = generate_uid()
  ds.SeriesNumber = series_number
  ds.SeriesDescription = series_description
  for keyword, value in extra_tags.items():
    setattr(ds, keyword, value)

  stored = np.clip(np.rint(hu.astype(np.float64) - WRITE_INTERCEPT),
                   _INT16_MIN, _INT16_MAX).astype("<i2")
  origin = np.zeros(3) if first_position is None else np.asarray(
      first_position, dtype=np.float64)
  out_dir.mkdir(parents=True, exist_ok=True)
  temporaries, linked = [], []
  try:
    for k in range(depth):
      _set_slice(ds, k, stored[k], template, origin, spacing[0])
      # Hidden, so read_series skips leftovers of a crash; created exclusively
      # (overwrite=False) with the user's umask, which the final link keeps.
      tmp = out_dir / f".{targets[k].name}.{uuid.uuid4().hex}.partial"
      temporaries.append(tmp)
      ds.save_as(tmp, enforce_file_format=True, overwrite=False)
    # All slices are complete on disk before any gets its final name; a link
    # (unlike rename) fails rather than replace a file created meanwhile.
    for tmp, target in zip(temporaries, targets):
      os.link(tmp, target)
      linked.append(target)
  except BaseException:
    for target in linked:
      os.unlink(target)
    raise
  finally:
    for tmp in temporaries:
      tmp.unlink(missing_ok=True)
  return targets


def _check_template(template: CTSeries, shape: tuple, spacing: tuple,
                    out_dir: pathlib.Path, patient_id, first_position) -> None:
  if template.hu.shape != shape:
    raise InputError(f"hu shape {shape} differs from the template's "
                     f"{template.hu.shape}")
  if len(template.headers) != shape[0]:
    raise InputError("template has no per-slice headers (it was not read by "
                     "read_series); cannot copy its tags and geometry")
  if not np.allclose(spacing, template.spacing, atol=1e-3):
    raise InputError(f"spacing {spacing} mm differs from the template's "
                     f"{template.spacing} mm")
  if out_dir.resolve() in template.source_dirs:
    raise InputError(f"refusing to write into {out_dir}: it holds the "
                     "template's source series")
  template_id = str(template.headers[0].get("PatientID", ""))
  if patient_id is not None and patient_id != template_id:
    raise InputError(f"patient_id {patient_id!r} differs from the template's "
                     f"{template_id!r}")
  if first_position is not None:
    raise InputError("first_position cannot be combined with a template: the "
                     "template's slice positions are used")


def _base_dataset(rows: int, cols: int, spacing: tuple, window) -> Dataset:
  """Series-level CT Image Storage dataset; per-slice tags set by _set_slice."""
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
  ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
  ds.SpecificCharacterSet = "ISO_IR 100"
  ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
  ds.SOPClassUID = CTImageStorage
  ds.Modality = "CT"
  ds.Manufacturer = "ldct_jax"
  ds.PatientName = ds.PatientID = "ANON"
  ds.PatientBirthDate = ""
  ds.PatientSex = ""
  ds.StudyDate = "19700101"  # fixed, not today: written files stay reproducible
  ds.StudyTime = "000000"
  ds.StudyID = ""
  ds.AccessionNumber = ""
  ds.ReferringPhysicianName = ""
  ds.PositionReferenceIndicator = ""
  ds.KVP = ""
  ds.AcquisitionNumber = 1
  ds.PatientPosition = "FFS"
  ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
  ds.PixelSpacing = [_ds_str(spacing[1]), _ds_str(spacing[2])]
  ds.SliceThickness = _ds_str(spacing[0])
  ds.SpacingBetweenSlices = _ds_str(spacing[0])
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.Rows, ds.Columns = rows, cols
  ds.BitsAllocated = 16
  ds.BitsStored = 16
  ds.HighBit = 15
  ds.PixelRepresentation = 1
  ds.RescaleIntercept = _ds_str(WRITE_INTERCEPT)
  ds.RescaleSlope = "1"
  ds.RescaleType = "HU"
  ds.WindowCenter = _ds_str(window.center)
  ds.WindowWidth = _ds_str(window.width)
  return ds


def _set_slice(ds: Dataset, k: int, stored: np.ndarray,
               template: CTSeries | None, origin: np.ndarray,
               slice_spacing: float) -> None:
  """Sets slice k's identity, geometry and pixels on the shared dataset."""
  ds.SOPInstanceUID = generate_uid()
  ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
  ds.InstanceNumber = k + 1
  if template is None:
    position = origin + np.array([0.0, 0.0, k * slice_spacing])
    ds.ImagePositionPatient = [_ds_str(v) for v in position]
    ds.SliceLocation = _ds_str(position[2])
  else:
    source = template.headers[k]
    for keyword in _TEMPLATE_SLICE_KEYWORDS:
      if keyword in source:
        setattr(ds, keyword, copy.deepcopy(source[keyword].value))
      elif keyword in ds:
        delattr(ds, keyword)
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.get("SOPClassUID", CTImageStorage)
    reference.ReferencedSOPInstanceUID = source.get("SOPInstanceUID", "")
    ds.SourceImageSequence = [reference]
  ds.PixelData = stored.tobytes()


def _ds_str(value: float) -> str:
  """Decimal String (<= 16 chars) that round-trips ordinary mm/HU values."""
  text = f"{float(value):.10g}"
  return text if len(text) <= 16 else f"{float(value):.9g}"


# ---------------------------------------------------------------- layouts


# Matched on lower-case text with '_' and '-' read as spaces, so folder names
# like '1.000000-Full_Dose_Images-12345' classify like descriptions.
_FULL_DOSE = re.compile(r"\bfull ?dose\b")
_LOW_DOSE = re.compile(r"\b(low|quarter) ?dose\b")


def find_pairs(root, *, layout: str = "auto",
               thickness: str | None = "1mm") -> list:
  """Finds the low-/normal-dose series pairs under a dataset root.

  Layouts:
    ``'mayo'`` (2016 Low Dose CT Grand Challenge):
      ``<root>/<patient>/full_<thickness>/*`` and
      ``<root>/<patient>/quarter_<thickness>/*`` (``.IMA``/``.dcm``, any case).
    ``'tcia'`` (LDCT-and-Projection-data):
      ``<root>/<patient>/<study>/<series>/*.dcm``; a series is full or low
      dose by its SeriesDescription (containing 'full dose', or 'low dose' /
      'quarter dose', any case), else by its folder name (e.g.
      ``1.000000-Full Dose Images-12345``). Pairs are formed within a study,
      one pair per study.
    ``'auto'``: Mayo if any patient folder has ``full_*``/``quarter_*``
      subfolders, else TCIA if series folders with files exist at depth 3.

  Args:
    root: dataset root.
    layout: ``'auto'``, ``'mayo'`` or ``'tcia'``.
    thickness: reconstruction slice thickness, e.g. ``'1mm'`` or ``'3mm'``.
      Mayo: picks the folders. TCIA: keeps series whose SliceThickness
      matches within 0.05 mm (series without the tag are kept); None keeps all.

  Returns:
    ``PatientPair``s sorted by (patient_id, study).

  Raises:
    ValueError: unknown layout, a root matching neither layout, a patient or
      study with only one dose (or several series of one dose), or no pairs.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise InputError(f"dataset root {root} does not exist or is not a folder")
  if layout == "auto":
    layout = _detect_layout(root)
  if layout == "mayo":
    pairs = _mayo_pairs(root, thickness)
  elif layout == "tcia":
    pairs = _tcia_pairs(root, thickness)
  else:
    raise InputError(f"unknown layout {layout!r}; use 'auto', 'mayo' or 'tcia'")
  if not pairs:
    raise InputError(f"no low/full-dose pairs found under {root} "
                     f"(layout {layout!r}, thickness {thickness!r})")
  return sorted(pairs, key=lambda p: (p.patient_id, p.study))


def _subdirs(folder: pathlib.Path) -> list:
  return sorted(p for p in folder.iterdir()
                if p.is_dir() and not p.name.startswith("."))


def _has_files(folder: pathlib.Path) -> bool:
  return any(p.is_file() and not p.name.startswith(".") for p in folder.iterdir())


def _detect_layout(root: pathlib.Path) -> str:
  for patient in _subdirs(root):
    if any(re.fullmatch(r"(full|quarter)_.+", d.name.lower())
           for d in _subdirs(patient)):
      return "mayo"
  for patient in _subdirs(root):
    for study in _subdirs(patient):
      if any(_has_files(series) for series in _subdirs(study)):
        return "tcia"
  raise InputError(
      f"{root} matches no known layout. Expected either Mayo 2016 "
      "(<root>/<patient>/full_1mm/*.IMA and <root>/<patient>/quarter_1mm/*.IMA, "
      "or *_3mm) or TCIA LDCT-and-Projection-data "
      "(<root>/<patient>/<study>/<series>/*.dcm with 'Full Dose Images' and "
      "'Low Dose Images' series)")


def _mayo_pairs(root: pathlib.Path, thickness: str | None) -> list:
  if thickness is None:
    raise InputError("the Mayo layout needs a thickness ('1mm' or '3mm') to "
                     "pick the full_/quarter_ folders")
  pairs = []
  for patient in _subdirs(root):
    by_name = {d.name.lower(): d for d in _subdirs(patient)}
    full = by_name.get(f"full_{thickness}".lower())
    low = by_name.get(f"quarter_{thickness}".lower())
    if full is None and low is None:
      continue
    if full is None or low is None:
      have, lacking = (full, "quarter") if low is None else (low, "full")
      raise InputError(f"patient {patient}: has {have} but no "
                       f"{lacking}_{thickness} folder")
    for d in (full, low):
      if not any(p.suffix.lower() in (".ima", ".dcm") for p in d.iterdir()):
        raise InputError(f"{d}: no .IMA or .dcm files")
    pairs.append(PatientPair(patient.name, low, full, "mayo"))
  return pairs


def _dose_of(text: str) -> str | None:
  text = re.sub(r"[_-]", " ", text.lower())
  full, low = bool(_FULL_DOSE.search(text)), bool(_LOW_DOSE.search(text))
  if full == low:
    return None
  return "full" if full else "low"


def _parse_thickness(thickness: str) -> float:
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*mm\s*", thickness)
  if not match:
    raise InputError(f"thickness must look like '1mm' or '3mm', got {thickness!r}")
  return float(match.group(1))


def _tcia_pairs(root: pathlib.Path, thickness: str | None) -> list:
  wanted_mm = None if thickness is None else _parse_thickness(thickness)
  pairs = []
  for patient in _subdirs(root):
    for study in _subdirs(patient):
      found = {"full": [], "low": []}
      skipped_thickness = []
      for series in _subdirs(study):
        files = _series_files(series, None)
        if not files:
          continue
        header = _dcmread(files[0], stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        dose = _dose_of(str(header.get("SeriesDescription", ""))) or _dose_of(series.name)
        if dose is None:
          continue
        slice_mm = _thickness_mismatch(header, wanted_mm)
        if slice_mm is not None:
          skipped_thickness.append(f"{series.name} ({slice_mm:g} mm)")
          continue
        found[dose].append(series)
      if not found["full"] and not found["low"]:
        if skipped_thickness:
          raise InputError(f"study {study}: no {thickness} series; found "
                           f"{', '.join(skipped_thickness)}; pass thickness=")
        continue
      for dose, other in (("full", "low"), ("low", "full")):
        if len(found[dose]) > 1:
          raise InputError(f"study {study}: several {dose}-dose series: "
                           f"{', '.join(s.name for s in found[dose])}")
        if not found[dose]:
          raise InputError(f"study {study}: has {other}-dose series "
                           f"{found[other][0].name} but no {dose}-dose series")
      pairs.append(PatientPair(patient.name, found["low"][0], found["full"][0],
                               "tcia", study.name))
  return pairs


def load_pair(pair: PatientPair) -> tuple:
  """Reads a pair and checks that its slices correspond one to one.

  Args:
    pair: from ``find_pairs``.

  Returns:
    ``(low_dose, full_dose)`` CTSeries with equal shapes and spacing, and
    slice k of one at the position of slice k of the other (within
    ``POSITION_TOL_MM``).

  Raises:
    ValueError: naming a file of each series, when slice sizes, counts,
      spacings, PatientIDs or positions disagree, or when positions are
      missing (pairing by position is then impossible).
  """
  low = read_series(pair.low_dose_dir)
  full = read_series(pair.full_dose_dir)
  if low.hu.shape[1:] != full.hu.shape[1:]:
    raise InputError(f"slice sizes differ: {low.files[0]} is "
                     f"{low.hu.shape[1:]} but {full.files[0]} is {full.hu.shape[1:]}")
  low_id, full_id = low.meta.get("PatientID"), full.meta.get("PatientID")
  if low_id and full_id and low_id != full_id:
    raise InputError(f"PatientIDs differ: {low.files[0]} has {low_id!r} but "
                     f"{full.files[0]} has {full_id!r}")
  if not (np.isfinite(low.positions).all() and np.isfinite(full.positions).all()):
    raise InputError(f"cannot pair {low.files[0]} with {full.files[0]}: slice "
                     "positions are missing")
  for k in range(min(len(low.files), len(full.files))):
    gap = float(np.max(np.abs(low.positions[k] - full.positions[k])))
    if gap > POSITION_TOL_MM:
      raise InputError(
          f"slice {k} positions differ by {gap:.4f} mm: {low.files[k]} at "
          f"{low.positions[k].tolist()} vs {full.files[k]} at "
          f"{full.positions[k].tolist()}")
  if len(low.files) != len(full.files):
    shorter, longer = sorted((low, full), key=lambda s: len(s.files))
    raise InputError(
        f"slice counts differ ({len(low.files)} low vs {len(full.files)} full "
        f"dose): {longer.files[len(shorter.files)]} has no counterpart after "
        f"{shorter.files[-1]}")
  if not np.allclose(low.spacing, full.spacing, atol=POSITION_TOL_MM):
    raise InputError(f"spacing differs: {low.files[0]} has {low.spacing} mm but "
                     f"{full.files[0]} has {full.spacing} mm")
  return low, full


# ---------------------------------------------------------------- one dose


@dataclasses.dataclass(frozen=True)
class SeriesRef:
  """One series of a single dose, found by ``find_series`` (not yet read).

  Attributes:
    patient_id: Mayo/TCIA patient folder name; in the flat layout the
      PatientID of the series' first file, else its folder name.
    study: TCIA study folder name; the series folder name in the flat
      layout; ``''`` for Mayo.
    folder: the series folder, for ``read_series``.
    layout: ``'mayo'``, ``'tcia'`` or ``'flat'``.
  """

  patient_id: str
  study: str
  folder: pathlib.Path
  layout: str


class NoSeriesError(InputError):
  """A readable tree with no series of the requested dose (or thickness).

  Raised by ``find_series`` only when the tree itself is well formed, so a
  caller can tell "this tree holds the other dose" from a broken tree.
  """


_DOSES = ("low", "full")
_DOSE_WORDS = {"low": "low-dose", "full": "full-dose"}
_MAYO_FOLDER = {"low": "quarter", "full": "full"}
_MAYO_DOSE_DIR = re.compile(r"(full|quarter)_.+")
_HEADER_TAGS = ["PatientID", "SeriesDescription", "SliceThickness", "Rows", "Columns"]


def detect_layout(root) -> str:
  """``'mayo'``, ``'tcia'`` or ``'flat'`` for a dataset root, tried in that order.

  Mayo: some patient folder has ``full_*``/``quarter_*`` subfolders. TCIA:
  some ``<patient>/<study>/<series>`` folder holds files. Flat: the root, or
  one of its subfolders, holds files. Raises ``InputError`` naming the root
  when it is missing, empty or matches none of them.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise InputError(f"dataset root {root} does not exist or is not a folder")
  if not any(not p.name.startswith(".") for p in root.iterdir()):
    raise InputError(f"dataset root {root} is empty")
  try:
    return _detect_layout(root)
  except InputError:
    pass
  if _has_files(root) or any(_has_files(d) for d in _subdirs(root)):
    return "flat"
  raise InputError(
      f"{root} matches no known layout and holds no DICOM files at depth 1-3. "
      "Expected Mayo 2016 (<root>/<patient>/full_1mm/*.IMA and/or "
      "quarter_1mm/*.IMA), TCIA LDCT-and-Projection-data "
      "(<root>/<patient>/<study>/<series>/*.dcm), or a flat folder of series "
      "(<root>/<series>/*.dcm, or the series files directly in <root>)")


def find_series(root, *, dose: str, layout: str = "auto",
                thickness: str | None = "1mm") -> list:
  """Finds the series of one dose under a dataset root; no partner needed.

  This is how unpaired data is read: a tree of low-dose series only (the
  scanner whose noise TDDL learns), or of full-dose series only (clean
  images for pseudo pairs). Series of the other dose may be present; they
  are skipped and never read for pixels (Mayo: not opened at all; TCIA: the
  first file's header is read to classify the series, as ``find_pairs``
  does).

  Layouts:
    ``'mayo'``: ``<root>/<patient>/quarter_<thickness>`` (low) or
      ``full_<thickness>`` (full). A patient may have only one of the two;
      patients without the requested one are skipped.
    ``'tcia'``: ``<root>/<patient>/<study>/<series>/*.dcm``, the dose told
      by SeriesDescription, else folder name, as in ``find_pairs``. A study
      may hold only one dose, but at most one series of the requested dose.
    ``'flat'``: ``<root>/<series>/*`` (each subfolder one series, one scan),
      or a root that is itself one series folder. Names cannot tell the
      dose in general, so **every series is taken as the requested dose**:
      the caller says what the folder holds. A series whose SeriesDescription
      (else folder name) says the other dose ('full dose' vs 'low dose' /
      'quarter dose') makes the tree a mixed tree, which is an error naming
      the folder. Patient id: PatientID of the first file, else the folder
      name; study: the folder name. Non-DICOM files (README, splits.json)
      directly in a root of series folders are ignored.
    ``'auto'``: ``detect_layout`` (Mayo, then TCIA, then flat).

  Args:
    root: dataset root.
    dose: ``'low'`` or ``'full'``.
    layout: ``'auto'``, ``'mayo'``, ``'tcia'`` or ``'flat'``.
    thickness: as in ``find_pairs``: Mayo picks ``*_<thickness>`` folders;
      TCIA and flat keep series whose SliceThickness matches within 0.05 mm
      (series without the tag are kept); None keeps all (not for Mayo).

  Returns:
    ``SeriesRef``s sorted by (patient_id, study).

  Raises:
    InputError: naming the path, for an unknown dose or layout, a missing or
      empty root, a patient or series folder with no DICOM files, mixed
      layouts, a mixed flat tree, several series of the dose in one TCIA
      study. ``NoSeriesError`` (an ``InputError``) when the tree holds no
      series of the requested dose, saying what it holds instead.
  """
  if dose not in _DOSES:
    raise InputError(f"dose must be 'low' or 'full', got {dose!r}")
  root = pathlib.Path(root)
  if layout == "auto":
    layout = detect_layout(root)
  elif not root.is_dir():
    raise InputError(f"dataset root {root} does not exist or is not a folder")
  if layout == "mayo":
    refs, found = _mayo_series(root, dose, thickness)
  elif layout == "tcia":
    refs, found = _tcia_series(root, dose, thickness)
  elif layout == "flat":
    refs, found = _flat_series(root, dose, thickness)
  else:
    raise InputError(f"unknown layout {layout!r}; use 'auto', 'mayo', 'tcia' or 'flat'")
  if not refs:
    what = "; ".join(found) if found else "no series at all"
    raise NoSeriesError(
        f"no {_DOSE_WORDS[dose]} series under {root} (layout {layout!r}, "
        f"thickness {thickness!r}): found {what}")
  return sorted(refs, key=lambda r: (r.patient_id, r.study))


def _mayo_series(root: pathlib.Path, dose: str, thickness: str | None) -> tuple:
  if thickness is None:
    raise InputError("the Mayo layout needs a thickness ('1mm' or '3mm') to "
                     "pick the full_/quarter_ folders")
  wanted = f"{_MAYO_FOLDER[dose]}_{thickness}".lower()
  other_name = f"{_MAYO_FOLDER[_other(dose)]}_{thickness}".lower()
  refs, others, other_thickness = [], [], set()
  for patient in _subdirs(root):
    dose_dirs = {d.name.lower(): d for d in _subdirs(patient)
                 if _MAYO_DOSE_DIR.fullmatch(d.name.lower())}
    if not dose_dirs:
      if not any(not p.name.startswith(".") for p in patient.iterdir()):
        raise InputError(f"patient folder {patient} holds no DICOM files")
      if _sidecar_folder(patient):
        continue
      raise InputError(
          f"patient folder {patient} has no full_*/quarter_* folders although "
          f"other patients of {root} do (Mayo layout): mixed layouts; move it "
          "out or give it <patient>/quarter_1mm or full_1mm folders")
    folder = dose_dirs.get(wanted)
    if folder is None:
      if other_name in dose_dirs:
        others.append(patient.name)
      else:
        other_thickness.update(sorted(dose_dirs[n].name for n in dose_dirs))
      continue
    # Only names are listed here: no file of either dose is opened.
    if not any(p.suffix.lower() in (".ima", ".dcm") for p in _series_files(folder, None)):
      raise InputError(f"{folder}: no .IMA or .dcm files")
    refs.append(SeriesRef(patient.name, "", folder, "mayo"))
  found = []
  if others:
    found.append(f"only {_DOSE_WORDS[_other(dose)]} series ({other_name} in "
                 f"{len(others)} patient(s): {', '.join(others[:5])}"
                 f"{', ...' if len(others) > 5 else ''})")
  if other_thickness:
    found.append(f"other thicknesses ({', '.join(sorted(other_thickness))}); "
                 "pass thickness=")
  return refs, found


def _other(dose: str) -> str:
  return "full" if dose == "low" else "low"


def _thickness_mismatch(header: Dataset, wanted_mm: float | None) -> float | None:
  """The series' SliceThickness in mm when it differs from wanted_mm, else None."""
  slice_mm = header.get("SliceThickness")
  if wanted_mm is None or slice_mm in (None, ""):
    return None
  slice_mm = float(slice_mm)
  return slice_mm if abs(slice_mm - wanted_mm) > 0.05 else None


def _tcia_series(root: pathlib.Path, dose: str, thickness: str | None) -> tuple:
  wanted_mm = None if thickness is None else _parse_thickness(thickness)
  refs, counts = [], {"other": 0, "unclassified": 0}
  for patient in _subdirs(root):
    series_seen = 0
    for study in _subdirs(patient):
      found, skipped_thickness = [], []
      for series in _subdirs(study):
        files = _series_files(series, None)
        if not files:
          continue
        series_seen += 1
        header = _dcmread(files[0], stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        series_dose = (_dose_of(str(header.get("SeriesDescription", "")))
                       or _dose_of(series.name))
        if series_dose is None:
          counts["unclassified"] += 1
          continue
        if series_dose != dose:
          counts["other"] += 1
          continue
        slice_mm = _thickness_mismatch(header, wanted_mm)
        if slice_mm is not None:
          skipped_thickness.append(f"{series.name} ({slice_mm:g} mm)")
          continue
        found.append(series)
      if len(found) > 1:
        raise InputError(f"study {study}: several {_DOSE_WORDS[dose]} series: "
                         f"{', '.join(s.name for s in found)}")
      if not found and skipped_thickness:
        raise InputError(f"study {study}: no {thickness} {_DOSE_WORDS[dose]} "
                         f"series; found {', '.join(skipped_thickness)}; pass thickness=")
      if found:
        refs.append(SeriesRef(patient.name, study.name, found[0], "tcia"))
    if not series_seen and not _sidecar_folder(patient):
      loose = "files directly in it or in a study folder" if (
          _has_files(patient) or any(_has_files(s) for s in _subdirs(patient))) else "no files"
      raise InputError(
          f"patient folder {patient} holds no DICOM series at "
          f"<patient>/<study>/<series>/*.dcm ({loose}); the TCIA layout was "
          f"detected for {root}, so this looks like a mixed or broken tree")
  found = []
  if counts["other"]:
    found.append(f"only {_DOSE_WORDS[_other(dose)]} series ({counts['other']})")
  if counts["unclassified"]:
    found.append(f"{counts['unclassified']} series whose SeriesDescription and "
                 "folder name name no dose ('full dose', 'low dose', 'quarter dose')")
  return refs, found


def _looks_like_dicom(path: pathlib.Path) -> bool:
  try:
    with open(path, "rb") as f:
      return f.read(132)[128:132] == b"DICM"
  except OSError:
    return False


def _sidecar_folder(folder: pathlib.Path) -> bool:
  """A folder of non-DICOM files only (e.g. the built-in data's ground_truth/
  of .npy volumes), which a layout walk skips rather than call broken."""
  files = _series_files(folder, None)
  return bool(files) and not _subdirs(folder) and not any(
      p.suffix.lower() in (".ima", ".dcm") or _looks_like_dicom(p) for p in files)


def _flat_series(root: pathlib.Path, dose: str, thickness: str | None) -> tuple:
  wanted_mm = None if thickness is None else _parse_thickness(thickness)
  subdirs = _subdirs(root)
  if not subdirs:
    if not _series_files(root, None):
      raise InputError(f"dataset root {root} is empty")
    folders = [root]
  else:
    loose = [p for p in _series_files(root, None) if _looks_like_dicom(p)]
    if loose:
      raise InputError(
          f"{root} holds both DICOM files ({loose[0].name}, ...) and subfolders: "
          "mixed layouts; a flat root is either one series folder or a folder "
          "of series folders")
    folders = subdirs
  refs, skipped_thickness = [], []
  for folder in folders:
    files = _series_files(folder, None)
    if not files:
      inside = ("only subfolders (a patient or study folder?): mixed layouts; "
                "each subfolder of a flat root must be one series"
                if _subdirs(folder) else "nothing")
      raise InputError(f"series folder {folder} holds no DICOM files, {inside}")
    header = _dcmread(files[0], stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    description = str(header.get("SeriesDescription", "") or "")
    said = _dose_of(description) or _dose_of(folder.name)
    if said == _other(dose):
      raise InputError(
          f"series folder {folder} is {_DOSE_WORDS[said]} by its "
          f"{'SeriesDescription ' + repr(description) if _dose_of(description) else 'name'}"
          f", but {root} was read as {_DOSE_WORDS[dose]} series only (flat layout): "
          "a mixed tree; keep the two doses in separate folders")
    slice_mm = _thickness_mismatch(header, wanted_mm)
    if slice_mm is not None:
      skipped_thickness.append(f"{folder.name} ({slice_mm:g} mm)")
      continue
    patient_id = str(header.get("PatientID", "") or "").strip() or folder.name
    refs.append(SeriesRef(patient_id, folder.name, folder, "flat"))
  found = []
  if skipped_thickness:
    found.append(f"series of other thicknesses: {', '.join(skipped_thickness[:5])}"
                 f"{', ...' if len(skipped_thickness) > 5 else ''}; pass "
                 "thickness= (None keeps all)")
  return refs, found
