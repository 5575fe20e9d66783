"""The order of an epoch, as the user's own loader draws it: which indices this rank reads,
the workers' base seed, and the random state the order was drawn from (for an exact resume)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from autoaccum.errors import ConfigError
from autoaccum.step.rng import RngState

__all__ = ["DrawState", "check_rank_sampler", "fork_base_seed"]


def fork_base_seed(generator: torch.Generator | None) -> torch.Generator:
    """Draw the workers' base seed as the user's own loader would, and replay it elsewhere.

    A DataLoader draws a base seed (from its generator, or torch's global RNG) when
    an epoch starts, *before* its sampler draws the permutation. We draw the same
    value at the same point so that a RandomSampler yields the very permutation the
    user's loader would, and return a copy of the generator's state from before the
    draw: the re-batching loader draws its base seed from that copy, so the workers
    get the user's seeds and the real RNG advances exactly once per epoch, as it
    would with the user's loader.
    """
    source = generator if generator is not None else torch.default_generator
    replay = torch.Generator(device=source.device)
    replay.set_state(source.get_state())
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return replay


@dataclass(frozen=True)
class DrawState:
    """The random streams an epoch's order is drawn from: the global ones and the loader's own
    generator, if it has one."""

    rng: RngState
    generator: torch.Tensor | None

    @classmethod
    def capture(cls, generator: torch.Generator | None) -> DrawState:
        return cls(RngState.capture(), generator.get_state() if generator is not None else None)

    def restore(self, generator: torch.Generator | None) -> None:
        self.rng.restore()
        if generator is not None and self.generator is not None:
            generator.set_state(self.generator)


def check_rank_sampler(sampler: Iterable[Any], *, rank: int, world_size: int) -> Iterable[Any]:
    """``sampler``, checked: a DistributedSampler (the user's own, giving each rank its share)
    must be for this rank and world size. Any other sampler gives the global order, which
    the ranks share window by window."""
    if isinstance(sampler, DistributedSampler) and (
        sampler.num_replicas != world_size or sampler.rank != rank
    ):
        raise ConfigError(
            f"the DataLoader's DistributedSampler is for rank {sampler.rank} of "
            f"{sampler.num_replicas}, but this process is rank {rank} of {world_size}; build it "
            f"with num_replicas={world_size}, rank={rank}, or pass the DataLoader without it "
            "(shuffle=True/False): autoaccum shares every window among the ranks itself, the "
            "same way on any number of ranks"
        )
    return sampler
