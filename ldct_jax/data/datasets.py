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

``with_dose_series(dataset, doses)`` adds several doses of each training
patient (the built-in ``extra_doses`` series) for blind training
(``data.blind_doses``); ``load_dataset`` itself never reads them.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Dict, List, Optional

import numpy as np

from ldct_jax.data import builtin, dicom, gaussian
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
  Any other tree that does not pair up is ``find_pairs``' error. With
  ``data.gaussian_noise.sigma > 0`` every pair becomes the Gaussian-noise
  task (``data.gaussian``): clipped NDCT and NDCT + white noise.
  """
  return gaussian.apply_config(_read_dataset(data_cfg), data_cfg)


def _read_dataset(data_cfg) -> CTDataset:
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
                     splits=split_subjects(data_cfg, root, sorted(set(patient_of.values())),
                                           wanted),
                     patient_of=patient_of, dose="full")
  if not pairs:
    raise ValueError(f"no low/full-dose patient pairs found under {root}")
  if wanted:
    pairs = [p for p in pairs if p.patient_id in set(wanted)]
  volumes, spacing, patient_of = {}, {}, {}
  for key, pair in zip(_scan_keys(pairs), pairs):
    low, full = dicom.load_pair(pair)
    volumes[key] = Volume(key, {"ld": low.hu, "nd": full.hu})
    spacing[key] = tuple(full.spacing)
    patient_of[key] = pair.patient_id
  ids = sorted(set(patient_of.values()))
  return CTDataset(root=root, layout=pairs[0].layout, volumes=volumes, spacing=spacing,
                   splits=split_subjects(data_cfg, root, ids, wanted), patient_of=patient_of,
                   is_builtin=is_builtin)


def split_subjects(data_cfg, root, ids, wanted=()) -> dict:
  """Patient (subject) splits: the split file (given, or shipped with the data as
  ``<root>/splits.json``, unless ``wanted`` restricts the ids), else the
  seeded fractions of ``data_cfg.split``. Shared by the CT and MRI readers."""
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


# ----------------------------------------------------------------------------
# Several doses per patient (blind training, ``data.blind_doses``)


def dose_key(fraction: float) -> str:
  """The array key of one dose of a blind-training volume: ``'ld@0.100'`` for 0.1.

  Three decimals, the precision of the built-in ``dose{f:.3f}_1mm`` folders.
  """
  return f"ld@{float(fraction):.3f}"


def blind_dose_keys(doses) -> tuple:
  """Checks ``data.blind_doses`` and returns its array keys, in order.

  Raises:
    InputError: a dose outside (0, 1) or two doses equal at three decimals.
  """
  doses = tuple(float(f) for f in doses)
  if not all(0.0 < f < 1.0 for f in doses):
    raise InputError(f"data.blind_doses {doses}: every dose fraction must be in (0, 1) "
                     "(1 is the full-dose target)")
  keys = tuple(dose_key(f) for f in doses)
  if len(set(keys)) != len(keys):
    raise InputError(f"data.blind_doses {doses} repeat a dose at three decimals "
                     "(the built-in dose folders' precision)")
  return keys


def with_dose_series(dataset: CTDataset, doses, split: str = "train") -> List[Volume]:
  """The ``split``'s volumes with one extra array per dose, keyed ``dose_key(f)``.

  Blind training (``data.blind_doses``) crops every dose of a patient at the
  same location, so each patient needs every dose, all made from the same
  full-dose photons: only the built-in data has that today (its
  ``extra_doses`` series, see ``builtin``). The dataset's own low dose (the
  ``'ld'`` array, ``quarter_1mm``) serves its fraction without a second copy;
  the other doses are read from ``<root>/<patient>/dose{f:.3f}_1mm/``. Only
  the requested doses and the split's patients are read, and ``dataset`` is
  left as it is (validation and evaluation keep the ordinary ``'ld'``).

  This is the supervised stage's (training-only) reader rather than part of
  ``load_dataset``: ``--mode=eval``/``denoise`` of a blind run on another
  ``data.root`` (a site's paired scans) must not need the extra series.

  Raises:
    InputError: ``dataset`` is not the built-in data, or lacks a dose (the
      message names the ``--config.data.builtin.extra_doses=`` to add).
  """
  keys = blind_dose_keys(doses)
  doses = tuple(float(f) for f in doses)
  if not dataset.is_builtin or dataset.dose != "paired":
    raise InputError(
        f"data.blind_doses {doses}: blind training needs several dose series per patient, "
        f"made from the same full-dose scan; only the built-in data provides them today, "
        f"and data.root {str(dataset.root)!r} is not it (leave data.root empty and set "
        "data.builtin.extra_doses)")
  meta_path = dataset.root / "dataset.json"
  with open(meta_path) as f:
    meta = json.load(f)
  # Datasets made before extra doses existed list no "doses": quarter only.
  listed = meta.get("doses") or {"quarter_1mm": meta["spec"]["dose_fraction"]}
  base = float(listed["quarter_1mm"])
  folder_of = {dose_key(dose): name for name, dose in listed.items()
               if name not in ("full_1mm", "quarter_1mm")}
  extras = sorted(float(d) for n, d in listed.items() if n not in ("full_1mm", "quarter_1mm"))
  missing = [f for f, key in zip(doses, keys)
             if key not in folder_of and key != dose_key(base)]
  if missing:
    wanted = sorted(set(extras) | set(missing))
    flag = "(" + ",".join(f"{f:g}" for f in wanted) + ("," if len(wanted) == 1 else "") + ")"
    raise InputError(
        f"data.blind_doses {doses}: the built-in data {dataset.root} has no dose "
        f"{', '.join(f'{f:g}' for f in missing)} (it has dose_fraction {base:g} and "
        f"extra_doses {tuple(extras)}); add --config.data.builtin.extra_doses='{flag}'")
  out = []
  for volume in dataset.split(split):
    patient = dataset.patient_of.get(volume.patient_id, volume.patient_id)
    arrays = dict(volume.arrays)
    for key in keys:
      if key == dose_key(base):
        arrays[key] = volume.arrays["ld"]  # same array, no copy
        continue
      series = dicom.read_series(dataset.root / patient / folder_of[key])
      if series.hu.shape != volume.shape:
        raise InputError(f"{dataset.root / patient / folder_of[key]}: shape "
                         f"{series.hu.shape} differs from the patient's paired series "
                         f"{volume.shape}")
      arrays[key] = series.hu
    out.append(Volume(volume.patient_id, arrays))
  return out
