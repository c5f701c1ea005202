"""CT datasets from a config or a folder: paired LD/ND, or one dose only.

``load_dataset(config.data)`` finds the patients, reads every low/full-dose
pair through the DICOM reader (validated pairing by slice position), and
splits patients into train/val/test (fixed by the split seed, or a shipped
split file). Both real and built-in data take exactly the same path; the
only difference is where ``root`` comes from. A tree that holds full-dose
series only (no low-dose series at all, or a flat folder of series) is read
as an NDCT-only dataset, split the same way: the clean side of TDDL's
pseudo pairs may come from such a tree.

``load_unpaired(root, dose=...)`` reads one dose of a tree with no partner
required, e.g. a site's own low-dose scans for TDDL's noise stage; the whole
tree is training data.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Dict, List, Optional

import numpy as np

from ldct_jax.data import builtin, dicom
from ldct_jax.errors import InputError
from ldct_jax.data.pipeline import (DEFAULT_SPLIT_FRACTIONS, Volume, load_split_file,
                                   split_patients)


@dataclasses.dataclass
class CTDataset:
  """Scans as in-memory HU volumes, keyed 'ld' (low dose) and 'nd' (normal dose).

  Paired datasets hold both arrays per volume; one-dose datasets (``dose``
  'low' or 'full') hold only 'ld' or only 'nd'.

  A patient may have several scans (TCIA studies); volumes are keyed by scan
  ('<patient>' or '<patient>_<study>') while splits are by patient, so all
  scans of a patient land in the same split.
  """

  root: pathlib.Path
  layout: str
  volumes: Dict[str, Volume]
  spacing: Dict[str, tuple]               # (slice, row, col) mm per scan
  splits: Dict[str, List[str]]            # split name -> patient ids
  patient_of: Dict[str, str] = dataclasses.field(default_factory=dict)  # scan -> patient
  is_builtin: bool = False
  # 'paired' (volumes hold 'ld' and 'nd'), 'low' (only 'ld') or 'full' (only 'nd').
  dose: str = "paired"

  def split(self, name: str) -> List[Volume]:
    """Volumes of split ``name`` ('train', 'val', 'test' or 'all')."""
    if name == "all":
      return [self.volumes[k] for k in sorted(self.volumes)]
    if name not in self.splits:
      raise ValueError(f"unknown split {name!r}; have {sorted(self.splits)} and 'all'")
    members = set(self.splits[name])
    return [self.volumes[k] for k in sorted(self.volumes)
            if self.patient_of.get(k, k) in members]

  def ground_truth(self, patient_id: str) -> Optional[np.ndarray]:
    return builtin.load_ground_truth(self.root, patient_id) if self.is_builtin else None


def resolve_root(data_cfg) -> tuple:
  """Returns ``(root, is_builtin)``: the configured root, or the built-in dataset."""
  if data_cfg.get("root"):
    root = pathlib.Path(data_cfg.root).expanduser()
    if not root.is_dir():
      raise ValueError(f"data.root {str(root)!r} is not a directory")
    return root, False
  spec = builtin.BuiltinSpec.from_config(data_cfg.get("builtin", {}))
  return builtin.ensure_builtin_dataset(spec, data_cfg.get("cache_dir")), True


def _scan_keys(refs) -> list:
  """'<patient>', or '<patient>_<study>' for patients with several scans."""
  per_patient = {}
  for ref in refs:
    per_patient[ref.patient_id] = per_patient.get(ref.patient_id, 0) + 1
  return [ref.patient_id if per_patient[ref.patient_id] == 1
          else f"{ref.patient_id}_{ref.study}" for ref in refs]


def _select_patients(refs, wanted, root) -> list:
  """Keeps the refs of the wanted patients; an unknown patient is an error."""
  if not wanted:
    return list(refs)
  wanted = set(wanted)
  unknown = sorted(wanted - {r.patient_id for r in refs})
  if unknown:
    have = sorted({r.patient_id for r in refs})
    raise InputError(f"patients {unknown} are not under {root}; it holds {have}")
  return [r for r in refs if r.patient_id in wanted]


def _read_one_dose(refs, dose: str) -> tuple:
  """Reads each series once; returns (volumes, spacing, patient_of)."""
  array_key = "ld" if dose == "low" else "nd"
  volumes, spacing, patient_of = {}, {}, {}
  for key, ref in zip(_scan_keys(refs), refs):
    if key in volumes:  # flat layout: two series folders, one PatientID, same name
      raise InputError(f"two scans of patient {ref.patient_id!r} are both named "
                       f"{key!r}: {ref.folder}")
    series = dicom.read_series(ref.folder)
    # Foreign one-dose data gets the denoise input's CT checks too: an MR or
    # rendered series in a site's folder must not become "LDCT noise".
    dicom.check_ct_series(series)
    volumes[key] = Volume(key, {array_key: series.hu})
    spacing[key] = tuple(series.spacing)
    patient_of[key] = ref.patient_id
  return volumes, spacing, patient_of


def load_unpaired(root, *, dose: str, layout: str = "auto",
                  thickness: Optional[str] = "1mm", patients=()) -> CTDataset:
  """Reads the series of one dose under ``root``; no partner series needed.

  ``dicom.find_series`` finds them (Mayo, TCIA or a flat folder of series;
  in the flat layout every series is taken as ``dose``, see there). Only the
  requested dose's series are read for pixels, so a noise root's full-dose
  series, if any, never enter the noise stage. Each series goes through
  ``dicom.read_series`` and ``dicom.check_ct_series`` (the validation and
  errors of paired data, plus the CT checks of the denoise input).

  Args:
    root: dataset root.
    dose: ``'low'`` (volumes hold ``'ld'``) or ``'full'`` (``'nd'``).
    layout: ``'auto'``, ``'mayo'``, ``'tcia'`` or ``'flat'``.
    thickness: as in ``dicom.find_series``.
    patients: keep only these patient ids (all when empty).

  Returns:
    A ``CTDataset`` with ``dose`` set, scans keyed ``'<patient>'`` (or
    ``'<patient>_<study>'`` for a patient with several), and ``splits``
    ``{'train': every patient, 'val': [], 'test': []}``: the whole tree is
    training data (a noise model has nothing to validate against here).

  Raises:
    InputError: naming the path, from ``find_series`` and ``read_series``, or
      for ``patients`` not in the tree.
  """
  root = pathlib.Path(root).expanduser()
  refs = dicom.find_series(root, dose=dose, layout=layout, thickness=thickness)
  refs = _select_patients(refs, patients, root)
  volumes, spacing, patient_of = _read_one_dose(refs, dose)
  ids = sorted(set(patient_of.values()))
  return CTDataset(root=root, layout=refs[0].layout, volumes=volumes, spacing=spacing,
                   splits={"train": ids, "val": [], "test": []}, patient_of=patient_of,
                   dose=dose)


def _full_dose_only(root, layout: str, thickness) -> bool:
  """True when ``root`` holds no low-dose series at all (so it is NDCT-only).

  A flat folder of series cannot say its dose; given as ``data.root`` (the
  clean side) it is taken as full dose.
  """
  if layout == "auto":
    layout = dicom.detect_layout(root)
  if layout == "flat":
    return True
  try:
    dicom.find_series(root, dose="low", layout=layout, thickness=thickness)
  except dicom.NoSeriesError:
    return True
  except InputError:
    return False
  return False


def load_dataset(data_cfg) -> CTDataset:
  """The dataset of ``data_cfg.root`` (else the built-in one), split by patient.

  A tree of LD/ND pairs gives paired volumes. A tree with full-dose series
  only (Mayo/TCIA with no low-dose series, or a flat folder of series, taken
  as full dose) gives ND-only volumes (``dose='full'``), split the same way.
  Any other tree that does not pair up is ``find_pairs``' error.
  """
  root, is_builtin = resolve_root(data_cfg)
  layout = data_cfg.get("layout", "auto")
  thickness = data_cfg.get("thickness", "1mm")
  wanted = data_cfg.get("patients")
  try:
    pairs = dicom.find_pairs(root, layout=layout, thickness=thickness)
  except InputError:
    # An NDCT-only tree (the clean side of pseudo pairs) is read alone; any
    # other tree that does not pair up keeps find_pairs' error.
    if is_builtin or not _full_dose_only(root, layout, thickness):
      raise
    refs = dicom.find_series(root, dose="full", layout=layout, thickness=thickness)
    refs = _select_patients(refs, wanted, root)
    volumes, spacing, patient_of = _read_one_dose(refs, "full")
    return CTDataset(root=root, layout=refs[0].layout, volumes=volumes, spacing=spacing,
                     splits=_split(data_cfg, root, sorted(set(patient_of.values())), wanted),
                     patient_of=patient_of, dose="full")
  if not pairs:
    raise ValueError(f"no low/full-dose patient pairs found under {root}")
  if wanted:
    pairs = [p for p in pairs if p.patient_id in set(wanted)]
  scans_per_patient = {}
  for pair in pairs:
    scans_per_patient[pair.patient_id] = scans_per_patient.get(pair.patient_id, 0) + 1
  volumes, spacing, patient_of = {}, {}, {}
  for pair in pairs:
    key = pair.patient_id
    if scans_per_patient[pair.patient_id] > 1:
      key = f"{pair.patient_id}_{pair.study}"
    low, full = dicom.load_pair(pair)
    volumes[key] = Volume(key, {"ld": low.hu, "nd": full.hu})
    spacing[key] = tuple(full.spacing)
    patient_of[key] = pair.patient_id
  ids = sorted(set(patient_of.values()))
  splits = _split(data_cfg, root, ids, wanted)
  return CTDataset(root=root, layout=pairs[0].layout, volumes=volumes, spacing=spacing,
                   splits={k: list(v) for k, v in splits.items()}, patient_of=patient_of,
                   is_builtin=is_builtin)


def _split(data_cfg, root, ids, wanted) -> dict:
  """Patient splits: the split file (given, or shipped with the data), else fractions."""
  split_cfg = data_cfg.get("split", {})
  split_file = split_cfg.get("file", "auto")
  if split_file == "auto":  # a split list shipped with the data, else fractions
    shipped = root / "splits.json"
    split_file = str(shipped) if shipped.exists() and not wanted else ""
  if split_file:
    splits = load_split_file(split_file)
    unknown = sorted(set(sum(splits.values(), [])) - set(ids))
    if unknown:
      raise ValueError(f"split file {split_file} names patients not under {root}: {unknown}")
  else:
    splits = split_patients(ids, tuple(split_cfg.get("fractions", DEFAULT_SPLIT_FRACTIONS)),
                            int(split_cfg.get("seed", 0)))
  return {k: list(v) for k, v in splits.items()}
