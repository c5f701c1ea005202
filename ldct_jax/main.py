r"""Command line: train, evaluate or denoise with any method of ldct_jax.

  python -m ldct_jax.main --config=configs/tddl.py
  python -m ldct_jax.main --config=configs/redcnn.py --workdir=runs/redcnn --mode=eval
  python -m ldct_jax.main --config=configs/redcnn.py --workdir=runs/redcnn --mode=denoise \
      --input=/data/L067/quarter_1mm --output=/data/L067/redcnn_1mm

This file only parses flags; the logic lives in ``ldct_jax.run`` so it can be
imported and tested (and used from notebooks).
"""
from absl import app, flags
from ml_collections import config_flags

from ldct_jax import run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory. Default for training: a fresh runs/<config>-<time>/; "
    "an existing workdir resumes.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "denoise"], "What to do.")
_INPUT = flags.DEFINE_string("input", None, "--mode=denoise: DICOM series folder to denoise.")
_OUTPUT = flags.DEFINE_string("output", None, "--mode=denoise: new folder for the denoised series.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                                "Which checkpoint eval/denoise use.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config_path = flags.FLAGS["config"].config_filename
  run.main(_CONFIG.value, mode=_MODE.value, workdir=_WORKDIR.value, config_path=config_path,
           input_dir=_INPUT.value, output_dir=_OUTPUT.value, checkpoint=_CHECKPOINT.value)


if __name__ == "__main__":
  app.run(main)
