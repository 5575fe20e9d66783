"""The global random streams (torch's CPU and CUDA, Python's, numpy's): capture, restore, and
run a block without moving them."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from autoaccum.device import cuda_initialized

__all__ = ["RngState", "preserved_rng"]


@dataclass(frozen=True)
class RngState:
    """The global random streams: torch (CPU, every CUDA device in use), Python, numpy."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None
    python: object
    numpy: object  #: None when numpy was never imported (then nothing of it can have moved)

    @classmethod
    def capture(cls) -> RngState:
        numpy = sys.modules.get("numpy")
        return cls(
            cpu=torch.get_rng_state(),
            cuda=torch.cuda.get_rng_state_all() if cuda_initialized() else None,
            python=random.getstate(),
            numpy=numpy.random.get_state() if numpy is not None else None,
        )

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)  # type: ignore[arg-type]
        numpy = sys.modules.get("numpy")
        if numpy is not None and self.numpy is not None:
            numpy.random.set_state(self.numpy)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without disturbing torch's (CPU, CUDA), Python's or numpy's RNG streams."""
    state = RngState.capture()
    try:
        yield
    finally:
        state.restore()
