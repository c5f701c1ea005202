"""Speed and noise calibration of ldct_jax.physics.ct (run by hand, not a test).

  python experiments/benchmark_ct.py            # ~3-5 min on 2 CPU cores
  python experiments/benchmark_ct.py --skip-fan # ~1 min

Prints, in one run:
  1. per-slice time of the parallel projector and FBP at 512^2 (720 angles,
     512 bins, skimage's circle=True setting) next to skimage's radon/iradon
     on the same slice, and the same for the default 512^2 geometries
     (parallel, and the fan beam at Zeng et al.'s distances);
  2. simulate_dose_levels / simulate_low_dose time for the built-in dataset's
     batch (32 slices of 256^2, doses 1.0 and 0.25, default geometry);
  3. HU noise std in a 200 mm water cylinder (256^2, 350 mm FOV) at dose 1.0
     and 0.25 for the default incident flux, and the flux that would give
     12 HU at full dose (noise ~ 1/sqrt(flux)), for calibrating the dataset.

Times are the median of --repeats runs after one compile-and-run call,
wall clock, with the 1-minute load average printed next to them: on a shared
machine they are upper bounds.
"""
import argparse
import os
import statistics
import time

import jax
import numpy as np
from skimage.data import shepp_logan_phantom
from skimage.transform import iradon, radon as skimage_radon, rescale

from ldct_jax.physics import ct

FOV_MM = 350.0


def _median_seconds(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _timed(label, fn, repeats, reference=None):
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  seconds = _median_seconds(fn, repeats)
  note = f"   (skimage {reference:.2f} s, {reference / seconds:.1f}x)" if reference else ""
  print(f"  {label:<44s} {seconds:7.3f} s   first call {first:6.2f} s{note}")
  return seconds


def _water_cylinder_hu(size, radius_mm, pixel_size):
  coords = (np.arange(size) - size // 2) * pixel_size
  inside = coords[None, :] ** 2 + coords[:, None] ** 2 <= radius_mm ** 2
  return np.where(inside, 0.0, -1000.0).astype(np.float32)


def bench_512(repeats, skip_fan):
  size, num_angles = 512, 720
  image = rescale(shepp_logan_phantom(), size / 400.0).astype(np.float32)
  theta_deg = np.arange(num_angles) * 180.0 / num_angles
  angles = np.deg2rad(theta_deg)
  print(f"\n512^2 slice, parallel, {num_angles} angles x 512 bins (skimage circle=True):")
  start = time.perf_counter()
  sino = skimage_radon(image, theta_deg)
  sk_radon = time.perf_counter() - start
  start = time.perf_counter()
  iradon(sino, theta_deg)
  sk_iradon = time.perf_counter() - start
  ours = jax.device_put(image)
  ours_sino = ct.radon(ours, angles)
  _timed("radon", lambda: ct.radon(ours, angles), repeats, sk_radon)
  _timed("fbp (ramp)", lambda: ct.fbp(ours_sino, angles, size), repeats, sk_iradon)

  pixel_size = FOV_MM / size
  parallel = ct.ParallelBeamGeometry.for_image(size, pixel_size)
  print(f"\n512^2 slice, default {parallel}:")
  mu = ct.hu_to_mu(1000.0 * image - 1000.0)
  psino = parallel.project(mu, pixel_size)
  _timed("project", lambda: parallel.project(mu, pixel_size), repeats)
  _timed("reconstruct", lambda: parallel.reconstruct(psino, size, pixel_size), repeats)
  if skip_fan:
    return
  fan = ct.FanBeamGeometry.for_image(size, pixel_size)
  print(f"\n512^2 slice, default {fan}:")
  fsino = fan.project(mu, pixel_size)
  _timed("fan project", lambda: fan.project(mu, pixel_size), repeats)
  _timed("fan reconstruct", lambda: fan.reconstruct(fsino, size, pixel_size), repeats)


def bench_dataset_batch(repeats):
  size, batch = 256, 32
  pixel_size = FOV_MM / size
  geometry = ct.ParallelBeamGeometry.for_image(size, pixel_size)
  print(f"\nDataset batch: {batch} x {size}^2, doses (1.0, 0.25), {geometry}:")
  slices = np.stack([_water_cylinder_hu(size, 100.0 + i, pixel_size) for i in range(batch)])
  keys = iter(jax.random.split(jax.random.key(0), 10 * repeats + 10))
  _timed("simulate_dose_levels (approx counts)",
         lambda: ct.simulate_dose_levels(slices, (1.0, 0.25), next(keys)), repeats)
  _timed("simulate_low_dose (approx counts)",
         lambda: ct.simulate_low_dose(slices, 0.25, next(keys)), repeats)
  _timed("simulate_dose_levels (exact Poisson/binomial)",
         lambda: ct.simulate_dose_levels(slices, (1.0, 0.25), next(keys), exact_counts=True),
         repeats)


def noise_calibration(target_full_dose_std=12.0):
  size = 256
  pixel_size = FOV_MM / size
  water = np.stack([_water_cylinder_hu(size, 100.0, pixel_size)] * 8)
  coords = (np.arange(size) - size // 2) * pixel_size
  roi = coords[None, :] ** 2 + coords[:, None] ** 2 <= 60.0 ** 2  # central 120 mm
  flux = 1e5

  def stds(incident_flux):
    levels = np.asarray(ct.simulate_dose_levels(water, (1.0, 0.25), jax.random.key(11),
                                                incident_flux=incident_flux))
    return [float(level[:, roi].std()) for level in levels]

  full, quarter = stds(flux)
  print(f"\nNoise in a 200 mm water cylinder, 256^2, {FOV_MM:g} mm FOV "
        f"({pixel_size:.3f} mm pixels), central 120 mm ROI, ramp filter, 8 slices:")
  print(f"  incident_flux={flux:.0e}: std {full:.1f} HU (dose 1.0), {quarter:.1f} HU "
        f"(dose 0.25), ratio {quarter / full:.2f}")
  calibrated = flux * (full / target_full_dose_std) ** 2
  full_c, quarter_c = stds(calibrated)
  print(f"  incident_flux={calibrated:.3g} (for {target_full_dose_std:g} HU): std "
        f"{full_c:.1f} HU (dose 1.0), {quarter_c:.1f} HU (dose 0.25)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip-fan", action="store_true", help="skip the slow 512^2 fan beam")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}")
  bench_512(args.repeats, args.skip_fan)
  bench_dataset_batch(args.repeats)
  noise_calibration()
  print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
