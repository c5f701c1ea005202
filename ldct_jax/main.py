r"""Command line: train, evaluate or predict with any method and task of ldct_jax.

  python -m ldct_jax.main --config=configs/tddl.py
  python -m ldct_jax.main --workdir=runs/redcnn --mode=eval [--config.eval.split=all ...]
  python -m ldct_jax.main --workdir=runs/redcnn --mode=denoise \
      --input=/data/L067/quarter_1mm --output=/data/L067/redcnn_1mm
  python -m ldct_jax.main --workdir=runs/mri_cascade --mode=reconstruct \
      --input=/data/fastmri/file1000001.h5 --output=/data/recon

``--mode=denoise`` is the CT task's predict command (a DICOM series in, a
denoised series out), ``--mode=reconstruct`` the MRI task's (fastMRI HDF5
files in, reconstructions out); each refuses a run of the other task.

Training needs ``--config``. Eval and predict start from the run's own
``<workdir>/config.json`` and apply only the ``--config.<field>=<value>``
overrides given on their command line (typed by that saved config); a config
file given with them is ignored. Expected input errors (a bad DICOM file, a
non-empty output folder, an override the trained model cannot take) print one
line and exit with status 2; a traceback means a bug.

This file only parses flags; the logic lives in ``ldct_jax.run`` so it can be
imported and tested (and used from notebooks).
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from ldct_jax.tasks import predict_modes  # light: imports no task module

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory. Default for training: a fresh runs/<config>-<time>/; "
    "an existing workdir resumes.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", *predict_modes()],
                          "What to do (denoise: CT runs; reconstruct: MRI runs).")
_INPUT = flags.DEFINE_string("input", None, "--mode=denoise: DICOM series folder to denoise; "
                             "--mode=reconstruct: a fastMRI .h5 file or a folder of them.")
_OUTPUT = flags.DEFINE_string("output", None, "--mode=denoise|reconstruct: new folder for "
                              "the results.")
_ALLOW_NONEMPTY = flags.DEFINE_bool(
    "allow_nonempty_output", False, "--mode=denoise|reconstruct: write into an --output folder that "
    "already holds files (new files get a unique prefix; nothing is overwritten).")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                                "Which checkpoint eval/denoise/reconstruct use.")
_CONFIG = None  # the config flag, defined by define_config_flag() from argv


def _argv_value(argv, name):
  """The value of ``--name=v`` or ``--name v`` in argv (last wins), else None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def define_config_flag(argv):
  """Defines ``--config`` before parsing; returns argv (minus an ignored --config=file).

  Eval/denoise on a workdir with a ``config.json`` get a config flag holding
  that saved config, so ``--config.x.y=v`` overrides are parsed with the
  trained run's field types and only they change it. Otherwise (training)
  ``--config`` is a config file, as usual.
  """
  global _CONFIG
  from ldct_jax import workdir as workdir_lib
  mode, workdir = _argv_value(argv, "mode"), _argv_value(argv, "workdir")
  if mode in ("eval", *predict_modes()) and workdir and os.path.exists(workdir_lib.config_path(workdir)):
    try:
      saved = workdir_lib.load_saved_config(workdir)
    except workdir_lib.InputError as e:
      sys.exit(f"ldct_jax: error: {e}")
    kept, skip = [], False
    for i, arg in enumerate(argv):
      if skip:
        skip = False
      elif arg.startswith("--config="):
        print(f"ldct_jax: {mode} uses {workdir_lib.config_path(workdir)}; {arg} is ignored "
              "(give changes as --config.<field>=<value>)", file=sys.stderr)
      elif arg == "--config":
        skip = True
      else:
        kept.append(arg)
    _CONFIG = config_flags.DEFINE_config_dict("config", saved, "The run's own config.",
                                              lock_config=True)
    return kept
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Experiment config file (configs/*.py[:variant]).", lock_config=True)
  return argv


def main(argv):
  from ldct_jax import run
  from ldct_jax.errors import InputError
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  if _MODE.value == "train" and _CONFIG.value is None:
    raise app.UsageError("--config=configs/<experiment>.py is required for training")
  try:  # returns nothing: app.run would print a returned report as an error
    if _MODE.value == "train":
      run.main(_CONFIG.value, mode="train", workdir=_WORKDIR.value,
               config_path=flags.FLAGS["config"].config_filename)
    else:
      run.main(None, mode=_MODE.value, workdir=_WORKDIR.value, overrides=overrides,
               input_dir=_INPUT.value, output_dir=_OUTPUT.value, checkpoint=_CHECKPOINT.value,
               allow_nonempty_output=_ALLOW_NONEMPTY.value)
  except InputError as e:
    print(f"ldct_jax: error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, argv=define_config_flag(sys.argv))
