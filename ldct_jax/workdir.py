"""A run's workdir: its stored config, what may change on resume or eval, the compile cache.

A workdir records the config it was trained with (``config.json``). Later
commands on it must agree with that config where it matters:

* ``--mode=train`` on an existing workdir resumes. Changing, say, the number
  of steps is fine (the differences are logged and the new config is stored
  beside the old one), but a config whose trained state has other shapes
  (another model width, another optimiser, another method) would restore
  garbage or fail deep inside orbax, so it is refused with the field named.
* ``--mode=eval`` / ``--mode=denoise`` start from the run's own config and
  apply only the overrides given on their command line (a new data root, an
  eval split), so nobody repeats the training overrides. An override that
  changes the trained state's shapes, or the input normalisation the model
  was trained with, is refused with the field named.

Whether a field changes the trained state is decided by tracing, not by a list
of field names: every stage's ``init_state`` is evaluated abstractly
(``jax.eval_shape``, no compute) under both configs and the leaf paths, shapes
and dtypes are compared. A field is blamed when applying it alone to the saved
config changes that signature.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional

import jax
import ml_collections

from ldct_jax.errors import InputError
from ldct_jax.train.logging import log

CONFIG_FILE = "config.json"
# Fields that do not change any shape but change what the trained model
# expects as input; overriding them would silently feed it the wrong scale.
INPUT_CONVENTION_FIELDS = ("data.normalization",)


def enable_compilation_cache(workdir: str) -> str:
  """Persistent XLA cache: a rerun (resume, eval, denoise) skips compilation.

  Runs can share one cache through ``$LDCT_JAX_COMPILATION_CACHE``; the
  default is ``<workdir>/.jax_cache``. Returns the cache directory.
  """
  cache = os.environ.get("LDCT_JAX_COMPILATION_CACHE") or os.path.join(workdir, ".jax_cache")
  jax.config.update("jax_compilation_cache_dir", cache)
  # Cache every program, not only those slower than jax's default 1 s: an
  # eval compiles dozens of small metric and padding programs, which together
  # cost more than the model's.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return cache


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
  """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (JSON-like nested dicts)."""
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, f"{prefix}{k}."))
    return out
  return {prefix.rstrip("."): tree}


def _as_config_value(value: Any) -> Any:
  """JSON value -> ConfigDict value: dicts become ConfigDicts, lists tuples.

  The configs use tuples for sequences (windows, split fractions); JSON stores
  them as lists, and config_flags can override tuple fields only.
  """
  if isinstance(value, Mapping):
    return ml_collections.ConfigDict({k: _as_config_value(v) for k, v in value.items()})
  if isinstance(value, list):
    return tuple(_as_config_value(v) for v in value)
  return value


def load_saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config ``<workdir>/config.json`` was trained with, as a ConfigDict."""
  path = config_path(workdir)
  if not os.path.exists(path):
    raise InputError(f"{path}: missing; --workdir={workdir!r} is not the workdir of a "
                     "training run")
  try:
    with open(path) as f:
      return _as_config_value(json.load(f))
  except json.JSONDecodeError as e:
    raise InputError(f"{path}: not valid JSON ({e})") from e


def changed_fields(old: ml_collections.ConfigDict,
                   new: ml_collections.ConfigDict) -> List[str]:
  """Dotted names of the leaves that differ (added or removed ones included)."""
  a = flatten(json.loads(old.to_json_best_effort(sort_keys=True)))
  b = flatten(json.loads(new.to_json_best_effort(sort_keys=True)))
  return sorted(k for k in set(a) | set(b) if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


def state_signature(config) -> Dict[str, tuple]:
  """Per stage: the (path, shape, dtype) of every leaf of its initial state.

  Traced with ``jax.eval_shape`` (no arrays are made), with each stage seeing
  the abstract final states of the earlier ones, as in training.
  """
  from ldct_jax.methods import build_method  # deferred: methods import the loop
  method = build_method(config, None)
  rng = jax.random.PRNGKey(0)
  previous: Dict[str, Any] = {}
  for stage in method.stages:
    previous[stage.name] = jax.eval_shape(stage.init_state, rng, previous)
  return {name: tuple((jax.tree_util.keystr(path), tuple(leaf.shape), str(leaf.dtype))
                      for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0])
          for name, state in previous.items()}


def _with_field(config: ml_collections.ConfigDict, dotted: str, source) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the field ``dotted`` taken from ``source``."""
  out = copy.deepcopy(config)
  out.unlock()
  *parents, leaf = dotted.split(".")
  node, src = out, source
  for name in parents:
    if name not in node:
      node[name] = ml_collections.ConfigDict()
    node, src = node[name], src[name]
  if leaf in src:
    node[leaf] = copy.deepcopy(src[leaf])
  elif leaf in node:
    del node[leaf]
  return out


def incompatible_fields(saved, config, fields: Optional[Iterable[str]] = None) -> List[str]:
  """Which of ``fields`` (default: all that differ) change what the trained state is.

  A field qualifies when it is, or lies under, an ``INPUT_CONVENTION_FIELDS``
  entry, or when applying it alone to ``saved`` changes ``state_signature``.
  Fields that change the signature only together are all reported.
  """
  fields = changed_fields(saved, config) if fields is None else sorted(fields)
  bad = [f for f in fields
         if any(f == c or f.startswith(c + ".") for c in INPUT_CONVENTION_FIELDS)]
  if set(bad) == set(fields):
    return bad
  reference = state_signature(saved)
  if state_signature(config) == reference:
    return bad
  alone = [f for f in fields if f not in bad
           and state_signature(_with_field(saved, f, config)) != reference]
  rest = [f for f in fields if f not in bad]
  return sorted(bad + (alone or rest))


def _describe(saved, config, fields: List[str]) -> str:
  a = flatten(json.loads(saved.to_json_best_effort()))
  b = flatten(json.loads(config.to_json_best_effort()))
  parts = []
  for f in fields:
    before = [v for k, v in a.items() if k == f or k.startswith(f + ".")]
    after = [v for k, v in b.items() if k == f or k.startswith(f + ".")]
    show = lambda v: "(unset)" if not v else (v[0] if len(v) == 1 else v)
    parts.append(f"{f} ({show(before)!r} -> {show(after)!r})")
  return ", ".join(parts)


def check_compatible(saved, config, workdir: str, *, fields: Optional[Iterable[str]] = None,
                     action: str = "resume") -> None:
  """Raises ``InputError`` naming the fields if ``config`` cannot use ``saved``'s checkpoints."""
  bad = incompatible_fields(saved, config, fields)
  if bad:
    raise InputError(
        f"{config_path(workdir)}: cannot {action} this run with {_describe(saved, config, bad)}: "
        "the trained model has other shapes or was trained on other inputs. "
        + ("Use a new --workdir to train that config." if action == "resume" else
           "Drop that override; eval and denoise use the run's own config."))


def check_resume_compatible(config, workdir: str) -> None:
  """Refuses to train ``config`` in a workdir whose saved config has other model shapes."""
  if os.path.exists(config_path(workdir)):
    check_compatible(load_saved_config(workdir), config, workdir, action="resume")


def prepare_workdir(config, workdir: str) -> None:
  """Creates the workdir, records the config, and enables the compilation cache.

  An existing ``config.json`` is never overwritten. Resuming with a config
  that differs in ways the checkpoints survive (more steps, another learning
  rate) is allowed: the differences are logged and the new config is stored
  beside the old one as ``config.<time>.json``. A config whose trained state
  has other shapes is refused, naming the fields (``check_compatible``).
  """
  path = config_path(workdir)
  saved = load_saved_config(workdir) if os.path.exists(path) else None
  changed = changed_fields(saved, config) if saved is not None else []
  if changed:
    check_compatible(saved, config, workdir, fields=changed, action="resume")
  os.makedirs(workdir, exist_ok=True)
  enable_compilation_cache(workdir)
  if jax.process_index() != 0:
    return
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if saved is None:
    with open(path, "w") as f:
      f.write(text)
    return
  if changed:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log(f"config differs from {path} in {changed}; saved as config.{stamp}.json")
    with open(os.path.join(workdir, f"config.{stamp}.json"), "w") as f:
      f.write(text)


def run_config(workdir: str, overrides: Optional[Mapping[str, Any]] = None,
               *, action: str = "evaluate") -> ml_collections.ConfigDict:
  """The run's own config with ``overrides`` (``{'eval.split': 'all'}``) applied.

  What ``--mode=eval|denoise`` use, and what notebooks should: the training
  overrides are in ``config.json`` already. Overrides that change the trained
  state's shapes or input normalisation raise ``InputError`` naming them.
  """
  saved = load_saved_config(workdir)
  config = copy.deepcopy(saved)
  for dotted, value in (overrides or {}).items():
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
      if name not in node:
        raise InputError(f"override {dotted}: {config_path(workdir)} has no field {name!r}")
      node = node[name]
    node[leaf] = _as_config_value(value)
  check_compatible(saved, config, workdir, fields=list(overrides or {}), action=action)
  return config
