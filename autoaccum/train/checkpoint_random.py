"""Each rank's random state in a checkpoint, as plain data: torch's CPU (and CUDA) generator
states as tensors, Python's and numpy's Mersenne Twister states as lists of integers.

Both the state of the moment a checkpoint was taken and the state its epoch's order was
drawn from are kept (the epoch's permutation is drawn again on resume, identically). A
loaded state is tried on a fresh generator of each kind before it becomes an
:class:`~autoaccum.probing.state.RngState`, so a damaged one is a clear error before any
global generator is touched.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import Any

import torch

from autoaccum.errors import ConfigError
from autoaccum.step.rng import RngState
from autoaccum.train.data.order import DrawState

__all__ = ["SavedDraw", "SavedRandom", "SavedRng", "decode_random", "encode_random"]


@dataclass(frozen=True)
class SavedRng:
    """:class:`~autoaccum.probing.state.RngState` as a checkpoint holds it."""

    cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...] | None
    python: tuple[int, tuple[int, ...], float | None]  #: version, internal state, gauss_next
    numpy: tuple[str, tuple[int, ...], int, int, float] | None  #: numpy.random.get_state()


@dataclass(frozen=True)
class SavedDraw:
    """:class:`~autoaccum.train.data.order.DrawState` as a checkpoint holds it."""

    rng: SavedRng
    generator: torch.Tensor | None


@dataclass(frozen=True)
class SavedRandom:
    """One rank's random state now, and the one its current epoch's order was drawn from."""

    now: SavedRng
    epoch_draw: SavedDraw | None


def _encode_rng(state: RngState) -> dict[str, Any]:
    python: Any = state.python  # random.getstate(): (version, internal state, gauss_next)
    version, internal, gauss = python
    numpy = None
    if state.numpy is not None:
        legacy: Any = state.numpy  # numpy.random.get_state(): (name, keys, pos, has_gauss, cached)
        name, keys, pos, has_gauss, cached = legacy
        numpy = (str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached))
    return {
        "cpu": state.cpu,
        "cuda": list(state.cuda) if state.cuda is not None else None,
        "python": (int(version), list(internal), gauss),
        "numpy": numpy,
    }


def encode_random(now: RngState, epoch_draw: object | None) -> dict[str, Any]:
    """This rank's random state ``now`` and its epoch's ``epoch_draw``, as plain data."""
    draw = None
    if isinstance(epoch_draw, DrawState):
        draw = {"rng": _encode_rng(epoch_draw.rng), "generator": epoch_draw.generator}
    elif epoch_draw is not None:
        raise ConfigError(
            f"cannot checkpoint the data's position: its epoch state is a "
            f"{type(epoch_draw).__name__}, not one autoaccum knows how to save"
        )
    return {"now": _encode_rng(now), "epoch_draw": draw}


def _generator_state(state: torch.Tensor, key: str) -> torch.Tensor:
    try:
        torch.Generator().set_state(state)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{key} is not a state of torch's CPU generator ({exc})") from None
    return state


def _bytes(state: torch.Tensor, key: str) -> torch.Tensor:
    if state.dtype != torch.uint8 or state.dim() != 1:
        raise ConfigError(
            f"{key} is no generator state (a {state.dtype} tensor of {state.dim()} dims)"
        )
    return state


def _rng(saved: SavedRng, key: str) -> RngState:
    cuda = None
    if saved.cuda is not None:
        cuda = [_bytes(t, f"{key}.cuda[{i}]") for i, t in enumerate(saved.cuda)]
    version, internal, gauss = saved.python
    python = (version, tuple(internal), gauss)
    try:
        random.Random().setstate(python)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ConfigError(f"{key}.python is not a state of Python's random ({exc})") from None
    numpy: object = saved.numpy
    np = sys.modules.get("numpy")
    if saved.numpy is not None and np is not None:
        name, keys, pos, has_gauss, cached = saved.numpy
        try:
            numpy = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
            np.random.RandomState().set_state(numpy)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ConfigError(f"{key}.numpy is not a state of numpy's random ({exc})") from None
    return RngState(_generator_state(saved.cpu, f"{key}.cpu"), cuda, python, numpy)


def decode_random(saved: SavedRandom, key: str) -> dict[str, Any]:
    """The random states of one rank (``{"now": RngState, "epoch_draw": DrawState | None}``),
    each tried on a fresh generator first: a damaged one is a :class:`ConfigError`."""
    draw = None
    if saved.epoch_draw is not None:
        generator = saved.epoch_draw.generator
        draw = DrawState(
            _rng(saved.epoch_draw.rng, f"{key}.epoch_draw.rng"),
            _bytes(generator, f"{key}.epoch_draw.generator") if generator is not None else None,
        )
    return {"now": _rng(saved.now, f"{key}.now"), "epoch_draw": draw}
