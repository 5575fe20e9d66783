"""``MODULE:FACTORY`` for ``autoaccum probe``: find the factory, call it, check what it made.

A factory is the user's code; anything wrong with it (not importable, not found, raising,
returning the wrong things) is a :class:`UsageError` that says what and where, never a
traceback from inside autoaccum.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

__all__ = ["FACTORY_CONTRACT", "Made", "UsageError", "load_factory", "make"]


FACTORY_CONTRACT = """\
FACTORY is called with no arguments and returns

    dict(model=..., batch=..., loss_fn=..., optimizer=...)

or the tuple (model, batch[, loss_fn[, optimizer]]):

  model      a torch.nn.Module (on any device: the command moves it to --device)
  batch      a sample batch of real samples (any number ≥ 1; a tensor, tuple, list or
             dict of tensors along dim 0); trials tile it to each size tried
  loss_fn    optional: loss_fn(model, batch) -> mean loss (a scalar tensor); default
             autoaccum.step.losses.default_loss (a dict batch is passed as keyword arguments
             and the output's .loss used; an (inputs, integer targets) pair gets
             cross-entropy)
  optimizer  optional: a torch.optim.Optimizer over model.parameters(); default
             torch.optim.AdamW(model.parameters()) built after the move

MODULE is imported from sys.path and the current directory (a dotted name), or is a
path to a .py file, e.g. my_models:make or ./train.py:make."""

_FACTORY_KEYS = ("model", "batch", "loss_fn", "optimizer")


class UsageError(Exception):
    """A command line that cannot run as written: exit code 2."""


# --------------------------------------------------------------------------- factories


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import(module_name: str) -> ModuleType:
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise UsageError(f"no such file: {module_name}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise UsageError(f"cannot import {module_name} as a Python module")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    with _cwd_on_path():
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing == module_name or module_name.startswith(missing + "."):
                raise UsageError(
                    f"no module named {module_name!r} (searched sys.path and the current "
                    f"directory {os.getcwd()})"
                ) from None
            raise  # the module exists but imports something missing: show where


def load_factory(spec: str) -> Callable[[], Any]:
    """The callable named by ``MODULE:FACTORY``; :class:`UsageError` when it is not there."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(
            f"expected MODULE:FACTORY (e.g. my_models:make or ./train.py:make), got {spec!r}"
        )
    module = _import(module_name)
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UsageError(f"{module_name} has no attribute {attr!r} (from {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"{spec} is a {type(target).__name__}, not a callable factory")
    return target  # type: ignore[no-any-return]


@dataclass
class Made:
    model: Any
    batch: Any
    loss_fn: Any = None
    optimizer: Any = None


def _call_factory(factory: Callable[[], Any], spec: str) -> Any:
    """``factory()``; an exception in it is a usage error that says where it was raised."""
    try:
        return factory()
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        last = frames[-1] if frames else None
        at = f" (at {last.filename}:{last.lineno}, in {last.name})" if last is not None else ""
        raise UsageError(f"{spec}() raised {type(exc).__name__}: {exc}{at}") from None


def _unpack(made: object, spec: str) -> Made:
    if isinstance(made, Mapping):
        unknown = sorted(str(k) for k in made if k not in _FACTORY_KEYS)
        if unknown:
            raise UsageError(
                f"{spec}() returned unknown keys {unknown}; the keys are {', '.join(_FACTORY_KEYS)}"
            )
        missing = [k for k in ("model", "batch") if k not in made]
        if missing:
            raise UsageError(f"{spec}() returned a dict without {' and '.join(missing)}")
        result = Made(**{str(k): v for k, v in made.items()})
    elif isinstance(made, (tuple, list)) and 2 <= len(made) <= 4:
        result = Made(*made)
    else:
        raise UsageError(
            f"{spec}() returned {type(made).__name__}; it must return "
            "dict(model=..., batch=..., loss_fn=..., optimizer=...) or (model, batch[, loss_fn"
            "[, optimizer]])"
        )
    if not isinstance(result.model, nn.Module):
        raise UsageError(
            f"{spec}(): model must be a torch.nn.Module, got {type(result.model).__name__}"
        )
    if result.optimizer is not None and not isinstance(result.optimizer, torch.optim.Optimizer):
        raise UsageError(
            f"{spec}(): optimizer must be a torch.optim.Optimizer built over the model's "
            f"parameters (or left out for AdamW), got {type(result.optimizer).__name__} "
            f"{result.optimizer!r}"
        )
    if result.loss_fn is not None and not callable(result.loss_fn):
        raise UsageError(
            f"{spec}(): loss_fn must be callable as loss_fn(model, batch), got "
            f"{type(result.loss_fn).__name__}"
        )
    return result


def make(spec: str) -> Made:
    """Find the factory named by ``spec``, call it and check what it returned."""
    return _unpack(_call_factory(load_factory(spec), spec), spec)
