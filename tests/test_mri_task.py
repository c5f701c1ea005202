"""The MRI task: batches, readout crop, evaluation and the reconstruct command."""
import numpy as np
import pytest

from ldct_jax.data import mri_pipeline
from ldct_jax.physics import mri


def _complex(rng, shape):
  return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def test_numpy_fft_twins_match_physics():
  rng = np.random.default_rng(0)
  x = _complex(rng, (2, 12, 10))
  np.testing.assert_allclose(mri_pipeline.fft2c(x), np.asarray(mri.fft2c(x)), atol=1e-5)
  np.testing.assert_allclose(mri_pipeline.ifft2c(x), np.asarray(mri.ifft2c(x)), atol=1e-5)


def _reference_zero_filled(k, column_mask):
  """float64 NumPy: F^H diag(m) F per row, written with explicit DFT matrices."""
  h, w = k.shape
  def centred_dft(n):
    j = np.arange(n) - n // 2
    return np.exp(-2j * np.pi * np.outer(j, j) / n) / np.sqrt(n)
  fh, fw = centred_dft(h), centred_dft(w)
  return fh.conj().T @ (k.astype(np.complex128) * column_mask[None, :]) @ fw.conj()


@pytest.mark.parametrize("height,crop", [(16, 8), (15, 6)])
def test_readout_crop_commutes_with_column_masks(height, crop):
  """Cropping the readout then undersampling equals undersampling then cropping the
  zero-filled image (exact for column masks: the mask acts along each row only)."""
  rng = np.random.default_rng(1)
  k = _complex(rng, (height, 10))
  column_mask = (rng.random(10) < 0.5).astype(np.float64)
  full = _reference_zero_filled(k, column_mask)
  top = (height - crop) // 2
  expected = full[top:top + crop]
  cropped = mri_pipeline.readout_crop(k, crop)
  got = mri_pipeline.ifft2c(cropped * column_mask[None, :].astype(np.float32))
  np.testing.assert_allclose(got, expected, atol=2e-5)


def test_make_example_scales_linearly_and_keeps_measurements():
  rng = np.random.default_rng(2)
  k = _complex(rng, (8, 8))
  mask = np.zeros((8, 8), np.float32)
  mask[:, [0, 3, 4, 6]] = 1
  ex = mri_pipeline.make_example(k, mask)
  s = ex["scale"]
  x = mri_pipeline.from_channels(ex["x"])
  assert np.isclose(np.abs(x).max(), 1.0, atol=1e-6)
  k0 = mri_pipeline.from_channels(ex["k0"])
  np.testing.assert_allclose(k0, s * k * mask, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mri_pipeline.from_channels(ex["target"]),
                             s * mri_pipeline.ifft2c(k), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(x, mri_pipeline.ifft2c(s * k * mask), rtol=1e-4, atol=1e-5)


def test_volume_masks_are_reproducible_per_file():
  a = mri_pipeline.volume_mask("random", (8, 64), 4, None, "file1.h5")
  b = mri_pipeline.volume_mask("random", (8, 64), 4, None, "file1.h5")
  c = mri_pipeline.volume_mask("random", (8, 64), 4, None, "file2.h5")
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_two_dimensional_masks_refuse_oversampled_readout():
  with pytest.raises(ValueError, match="column masks"):
    mri_pipeline.check_mask_kind("variable_density_2d", 32, 16, "f.h5")
  mri_pipeline.check_mask_kind("variable_density_2d", 16, 16, "f.h5")


# ----------------------------------------------------------------- end to end

import json  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import h5py  # noqa: E402

from ldct_jax import run  # noqa: E402
from ldct_jax.data import fastmri  # noqa: E402
from ldct_jax.errors import InputError  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(cache_dir, **builtin):
  sys.path.insert(0, str(REPO))
  from configs import mri_cascade
  config = mri_cascade.get_config()
  config.model.update(dict(num_cascades=2, depth=3, features=8))
  config.train.update(dict(num_steps=4, eval_every=2, checkpoint_every=2, log_every=2,
                           tensorboard=False))
  config.data.builtin_mri.update(dict(num_phantoms=3, slices_per_subject=3, size=24, **builtin))
  config.data.batch_size = 2
  config.data.cache_dir = str(cache_dir)
  config.eval.update(dict(cs_lambdas=(1e-3,), cs_iters=(5, 10), batch_size=2))
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("mri")
  workdir = str(tmp / "run")
  config = tiny_config(tmp / "cache", readout_oversampling=2)
  report = run.train_and_evaluate(config, workdir)
  return config, workdir, report, tmp


def test_train_eval_report_matches_an_independent_computation(trained):
  from skimage.metrics import peak_signal_noise_ratio
  config, workdir, report, _ = trained
  assert set(report["mean"]) == {"zero_filled", "cs_tv", "model"}
  assert set(report["mean"]["model"]) == {"psnr", "ssim", "nmse", "seconds_per_slice"}
  saved = json.loads(pathlib.Path(workdir, "eval", "metrics.json").read_text())
  assert saved["mean"] == report["mean"] and saved["conventions"]["cs_tv"]["num_iters"] in (5, 10)
  assert list(pathlib.Path(workdir, "eval", "panels").glob("*.png"))
  # zero-filled PSNR of each test volume, from the file with NumPy + scikit-image:
  from ldct_jax.tasks import mri as mri_task
  dataset = mri_task.load_dataset(config)
  psnrs = []
  for f in dataset.split("test"):
    assert f.kspace_shape[-2] == 2 * f.recon_size[0]  # oversampled readout, cropped
    mask = mri_task.eval_mask(config, f)
    h, w = f.recon_size
    zf, ref = [], []
    for z in range(f.num_slices):
      k = f.read_kspace(z).astype(np.complex128)
      image = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k), norm="ortho"))
      top = (image.shape[0] - h) // 2
      image = image[top:top + h]  # readout crop, then undersample the cropped grid
      kc = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image), norm="ortho"))
      x = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kc * mask), norm="ortho"))
      left = (x.shape[1] - w) // 2
      zf.append(np.abs(x)[:, left:left + w])
      ref.append(f.read_target(z))
    zf, ref = np.stack(zf), np.stack(ref).astype(np.float64)
    psnrs.append(peak_signal_noise_ratio(ref, zf, data_range=ref.max()))
  assert report["mean"]["zero_filled"]["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-3)


def test_reconstruct_command_writes_new_files_and_uses_a_files_own_mask(trained):
  config, workdir, _, tmp = trained
  from ldct_jax.tasks import mri as mri_task
  dataset = mri_task.load_dataset(config)
  source = dataset.split("test")[0]
  k = np.stack([source.read_kspace(z) for z in range(source.num_slices)])
  own = np.zeros(k.shape[-1], np.float32)
  own[::3] = 1
  own[k.shape[-1] // 2 - 2:k.shape[-1] // 2 + 2] = 1
  inputs = tmp / "inputs"
  inputs.mkdir()
  fastmri.write_fastmri_file(inputs / "undersampled.h5", k * own, None, mask=own,
                             recon_size=source.recon_size)
  before = (inputs / "undersampled.h5").read_bytes()
  out = tmp / "recon"
  result = subprocess.run(
      [sys.executable, "-m", "ldct_jax.main", f"--workdir={workdir}", "--mode=reconstruct",
       f"--input={inputs}", f"--output={out}"], capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 0, result.stderr
  assert (inputs / "undersampled.h5").read_bytes() == before
  with h5py.File(out / "undersampled.h5", "r") as h:
    recon = h["reconstruction"][()]
    assert recon.shape == (source.num_slices,) + tuple(source.recon_size)
    assert "own mask" in h.attrs["undersampling"]
  with pytest.raises(InputError, match="not empty"):
    run.main(None, mode="reconstruct", workdir=workdir, input_dir=str(inputs),
             output_dir=str(out))
  with pytest.raises(InputError, match="inside the input folder"):
    run.main(None, mode="reconstruct", workdir=workdir, input_dir=str(inputs),
             output_dir=str(inputs / "out"))
  # one file in: any new folder, even beside it; the input stays untouched
  single = run.main(None, mode="reconstruct", workdir=workdir,
                    input_dir=str(inputs / "undersampled.h5"), output_dir=str(inputs / "one"))
  assert [pathlib.Path(p).name for p in single] == ["undersampled.h5"]
  with h5py.File(single[0], "r") as h:
    np.testing.assert_array_equal(h["reconstruction"][()], recon)
  assert (inputs / "undersampled.h5").read_bytes() == before
  with pytest.raises(InputError, match="--mode=reconstruct"):
    run.main(None, mode="denoise", workdir=workdir, input_dir=str(inputs),
             output_dir=str(tmp / "other"))


def test_ct_runs_refuse_reconstruct(tmp_path):
  from ldct_jax.tasks import get_task
  from ml_collections import ConfigDict
  assert get_task(ConfigDict({})).predict_mode == "denoise"  # configs saved before tasks
  assert get_task(ConfigDict({"task": "mri_reconstruction"})).predict_mode == "reconstruct"
  # the CLI's --mode enum lists exactly the tasks' predict commands
  from ldct_jax.tasks import TASKS, predict_modes
  assert sorted(predict_modes()) == sorted(
      get_task(ConfigDict({"task": name})).predict_mode for name in TASKS)
