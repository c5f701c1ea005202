"""Multi-host training and preemption, with real processes.

Two processes on the loopback interface (``jax.distributed`` through
``run.maybe_initialize_distributed``, CPU collectives over gloo, one CPU device
each) train the tiny stage of ``tests/multihost_worker.py`` and must match one
process with two devices exactly; a SIGTERM to one of them must stop both at
the same step with a checkpoint, and a rerun must finish with the same
parameters. A single training process, SIGTERMed mid-run, must checkpoint,
exit cleanly and resume to the uninterrupted run's parameters.

Workers share the test session's persistent compilation cache
(``$LDCT_JAX_COMPILATION_CACHE``, set in conftest.py), so only the first launch
of each topology compiles.

Every process has a timeout, so a deadlock fails the test instead of hanging.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
NUM_STEPS = 16
EVALS = 2        # every 8 steps: multihost_worker.LOOP['eval_every']
CHECK_EVERY = 3  # multihost_worker.LOOP['preemption_check_every']
TIMEOUT = 120


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(tmp, name, *, processes=1, devices=1, delay=0.0, workdir=None):
  """Starts the worker ``processes`` times (one distributed job); returns (procs, out)."""
  out = os.path.join(tmp, name)
  os.makedirs(out, exist_ok=True)
  args = json.dumps({"workdir": workdir or os.path.join(tmp, name, "workdir"), "out": out,
                     "num_steps": NUM_STEPS, "delay": delay})
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(JAX_PLATFORMS="cpu", CI="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  if processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
               JAX_NUM_PROCESSES=str(processes))
  procs = []
  for i in range(processes):
    log = open(os.path.join(out, f"log_{i}.txt"), "w")
    procs.append(subprocess.Popen([sys.executable, WORKER, args], stdout=log,
                                  stderr=subprocess.STDOUT,
                                  env={**env, "JAX_PROCESS_ID": str(i)} if processes > 1 else env))
  return procs, out


def wait(procs, out, deadline=None):
  """Waits for every process; kills all and fails on a timeout or a non-zero exit."""
  deadline = deadline or time.monotonic() + TIMEOUT
  for proc in procs:
    try:
      proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      pytest.fail(f"timed out (deadlock?); logs:\n{logs(out, len(procs))}")
  codes = [p.returncode for p in procs]
  assert codes == [0] * len(procs), f"exit codes {codes}; logs:\n{logs(out, len(procs))}"
  results = []
  for i in range(len(procs)):
    with open(os.path.join(out, f"result_{i}.json")) as f:
      results.append(json.load(f))
  return results


def logs(out, count):
  texts = []
  for i in range(count):
    with open(os.path.join(out, f"log_{i}.txt"), errors="replace") as f:
      texts.append(f"--- process {i}\n{f.read()[-3000:]}")
  return "\n".join(texts)


def sigterm_when_reached(proc, out, index, step, deadline):
  """SIGTERMs ``proc`` once worker ``index`` has consumed ``step`` batches."""
  path = os.path.join(out, f"progress_{index}")
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      pytest.fail(f"process {index} ended before step {step}:\n{logs(out, index + 1)}")
    try:
      with open(path) as f:
        if int(f.read() or 0) >= step:
          proc.send_signal(signal.SIGTERM)
          return
    except FileNotFoundError:
      pass
    time.sleep(0.02)
  pytest.fail("never reached the step to signal at")


def params(out, index=0):
  with np.load(os.path.join(out, f"params_{index}.npz")) as data:
    return {k: data[k] for k in data.files}


def assert_same_params(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def checkpoint_steps(workdir):
  directory = os.path.join(workdir, "checkpoints", "tiny")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def flatten(tree, prefix=""):
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}/").items()}
  return {prefix.rstrip("/"): tree}


def assert_same_val(a, b):
  """Equal lists of (nested) metric dicts, up to float rounding."""
  assert len(a) == len(b)
  for x, y in zip(a, b):
    x, y = flatten(x), flatten(y)
    assert x.keys() == y.keys()
    np.testing.assert_allclose([x[k] for k in x], [y[k] for k in x], rtol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted process with two devices: (result, output folder)."""
  tmp = str(tmp_path_factory.mktemp("reference"))
  ref = wait(*launch(tmp, "ref", devices=2))[0]
  assert (ref["finished"], ref["process_count"], ref["device_count"]) == (True, 1, 2)
  assert len(ref["val"]) == EVALS
  # 3 validation volumes of 2 slices, 3 test volumes of 3: one batch each.
  assert (ref["val_denoise_calls"], ref["eval_denoise_calls"]) == (3 * EVALS, 3)
  return ref, os.path.join(tmp, "ref")


@pytest.mark.slow
def test_two_processes_match_one_process_and_stop_together_on_sigterm(tmp_path, reference):
  tmp = str(tmp_path)
  ref, ref_out = reference

  # Two processes, one device each, uninterrupted: the same parameters and the
  # same validation scores on both processes (they rank checkpoints alike).
  procs, out = launch(tmp, "two", processes=2)
  two = wait(procs, out)
  assert [(r["process_count"], r["local_device_count"], r["finished"]) for r in two] == [
      (2, 1, True)] * 2
  assert_same_params(params(out, 0), params(ref_out))
  assert_same_params(params(out, 1), params(ref_out))
  for r in two:
    assert_same_val(r["val"], ref["val"])
    assert_same_val([r["eval_mean"]], [ref["eval_mean"]])
  # Each volume denoised once, by one process (shares 2 and 1), in validation and eval.
  assert [r["val_denoise_calls"] for r in two] == [2 * EVALS, EVALS]
  assert [r["eval_denoise_calls"] for r in two] == [2, 1]
  # Process 0 wrote the panels of every patient, those scored by process 1 included.
  panels = sorted(os.listdir(os.path.join(out, "workdir", "eval", "panels")))
  assert panels == sorted(f"p3_{i}_z001_{w}.png" for i in range(3) for w in ("abdomen", "lung"))

  # SIGTERM to process 1 only, mid-run: both stop at the same step (the next
  # all-host check), with a checkpoint there, and exit cleanly.
  workdir = os.path.join(tmp, "preempted_workdir")
  procs, out = launch(tmp, "stop", processes=2, delay=0.25, workdir=workdir)
  deadline = time.monotonic() + TIMEOUT
  sigterm_when_reached(procs[1], out, 1, 5, deadline)
  stopped = wait(procs, out, deadline)
  steps = [r["position"] for r in stopped]
  assert not any(r["finished"] for r in stopped), steps
  assert steps[0] == steps[1] and 5 <= steps[0] < NUM_STEPS, steps
  assert steps[0] % CHECK_EVERY == 0, steps
  assert checkpoint_steps(workdir)[-1] == steps[0]
  assert stopped[0]["val"] == stopped[1]["val"]

  # Rerun both: resumes from that checkpoint to the reference parameters.
  procs, out = launch(tmp, "resume", processes=2, workdir=workdir)
  resumed = wait(procs, out)
  assert all(r["finished"] and r["position"] == NUM_STEPS for r in resumed)
  assert_same_params(params(out, 0), params(ref_out))
  assert_same_params(params(out, 1), params(ref_out))
  assert_same_val(stopped[0]["val"] + resumed[0]["val"], ref["val"])
  assert resumed[0]["val"] == resumed[1]["val"]


@pytest.mark.slow
def test_sigterm_checkpoints_a_single_process_and_a_rerun_resumes(tmp_path, reference):
  tmp = str(tmp_path)
  workdir = os.path.join(tmp, "preempted_workdir")
  procs, out = launch(tmp, "stop", devices=2, delay=0.25, workdir=workdir)
  deadline = time.monotonic() + TIMEOUT
  sigterm_when_reached(procs[0], out, 0, 4, deadline)
  stopped = wait(procs, out, deadline)[0]
  # One process checks its flag every step: it stops right after the signal.
  assert not stopped["finished"] and 4 <= stopped["position"] < NUM_STEPS
  assert checkpoint_steps(workdir)[-1] == stopped["position"]
  with open(os.path.join(workdir, "logs", "metrics.jsonl")) as f:
    last = [json.loads(l) for l in f][-1]
  assert last["stage_step"] == stopped["position"]
  resumed = wait(*launch(tmp, "resume", devices=2, workdir=workdir))[0]
  assert resumed["finished"]
  assert_same_params(params(os.path.join(tmp, "resume")), params(reference[1]))
  assert_same_val(stopped["val"] + resumed["val"], reference[0]["val"])
