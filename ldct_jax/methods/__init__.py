"""Training methods. Each builds its own state pytree and pure step functions.

A method is a function ``build(config, dataset) -> MethodSpec`` registered
under a name; ``config.method`` selects it. The training loop
(``ldct_jax.train.loop``) knows no method by name.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Dict, List

from ldct_jax.train.loop import Stage

# name -> module defining ``build``; imported lazily.
METHODS = {
    "supervised": "ldct_jax.methods.supervised",
    "tddl": "ldct_jax.methods.tddl",
    "wgan": "ldct_jax.methods.wgan",
    "mri_supervised": "ldct_jax.methods.mri_supervised",
    "sure": "ldct_jax.methods.sure",
    "mri_gsure": "ldct_jax.methods.mri_gsure",
}


@dataclasses.dataclass
class MethodSpec:
  """What a method gives the loop, the evaluator and the denoise command.

  Attributes:
    stages: trainable stages, run in order.
    denoise: ``(variables, x) -> y``, jitted ONCE when the method is built: it
      maps a batch of normalised LDCT inputs (NHWC, or NDHWC slabs when
      ``input_slab > 1``) to normalised denoised slices (NHWC). The trained
      variables are an argument, never constants baked into the program, so
      validation after every checkpoint, ``--mode=eval`` and ``--mode=denoise``
      reuse one compiled program per input shape (and the persistent
      compilation cache can hit across runs).
    inference_variables: ``state -> variables`` for ``denoise``, from the
      final stage's state.
    input_slab: adjacent slices per input (1 for 2D models).
    description: one line naming the model, for DICOM SeriesDescription and reports.
    extra_reports: name -> ``(states, dataset) -> dict``, run by ``--mode=eval``
      with every stage's trained state (e.g. TDDL's noise fidelity check).
  """

  stages: List[Stage]
  denoise: Callable[[Any, Any], Any]
  inference_variables: Callable[[Any], Any]
  input_slab: int = 1
  description: str = ""
  extra_reports: Dict[str, Callable] = dataclasses.field(default_factory=dict)

  @property
  def denoiser_stage(self) -> Stage:
    return self.stages[-1]

  def denoiser(self, state) -> Callable:
    """``fn(x) -> y`` for one trained state, calling the once-compiled ``denoise``."""
    return bind_denoiser(self.denoise, self.inference_variables)(state)


def bind_denoiser(denoise: Callable, inference_variables: Callable) -> Callable:
  """``state -> fn(x)``: binds a state's variables to the jitted ``denoise``.

  No new jit is created per state (a ``functools.partial`` of the same jitted
  function), so binding the state of every validation costs no compilation.
  """
  return lambda state: functools.partial(denoise, inference_variables(state))


def build_method(config, dataset) -> MethodSpec:
  name = config.method
  try:
    module = METHODS[name]
  except KeyError:
    raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}") from None
  return importlib.import_module(module).build(config, dataset)
