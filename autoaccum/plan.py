"""The planner: pure arithmetic that turns a largest micro-batch into an exact plan."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from autoaccum.errors import ConfigError, PlanError

__all__ = ["Plan", "check_count", "even_split", "make_plan"]


def check_count(name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` as an int ≥ ``minimum``, or a :class:`ConfigError` that says what to pass."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{name} must be an int, got {type(value).__name__} {value!r}; pass a whole number "
            f"≥ {minimum}, e.g. {name}=256"
        )
    if value < minimum:
        raise ConfigError(f"{name} must be ≥ {minimum}, got {value}")
    return value


def even_split(total: int, parts: int) -> tuple[int, ...]:
    """``total`` split into ``parts`` sizes that differ by at most one, largest first.

    >>> even_split(256, 3)
    (86, 85, 85)
    """
    base, extra = divmod(total, parts)
    return tuple(base + 1 if i < extra else base for i in range(parts))


@dataclass(frozen=True)
class Plan:
    """How one optimizer step's ``target_batch`` samples are laid out.

    ``micro_sizes`` are one rank's micro-batches in one window, so
    ``sum(micro_sizes) * world_size == target_batch`` always holds.
    """

    target_batch: int
    world_size: int
    micro_batch: int
    accum_iter: int
    micro_sizes: tuple[int, ...]

    @property
    def per_rank(self) -> int:
        """Samples each rank processes per optimizer step."""
        return self.target_batch // self.world_size

    def window_sizes(self, samples: int) -> tuple[int, ...]:
        """Micro sizes for a (possibly short, last) window of ``samples`` on one rank.

        A full window gives ``micro_sizes``; a short one is split as evenly as the
        full one would be, into no more micro-batches than needed.
        """
        if samples == self.per_rank:
            return self.micro_sizes
        if samples <= 0:
            return ()
        return even_split(samples, math.ceil(samples / self.micro_batch))

    def describe(self) -> str:
        """One line, e.g. ``256 = 86+85+85 (accum_iter 3) × 1 rank``."""
        if len(set(self.micro_sizes)) == 1:
            sizes = f"{self.micro_sizes[0]} × {self.accum_iter}"
        else:
            sizes = "+".join(str(s) for s in self.micro_sizes)
        ranks = "rank" if self.world_size == 1 else "ranks"
        return (
            f"target_batch {self.target_batch} = {sizes} (accum_iter {self.accum_iter}) "
            f"× {self.world_size} {ranks}"
        )

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "micro_sizes": list(self.micro_sizes)}


def _nearest_multiples(value: int, step: int) -> str:
    below = (value // step) * step
    above = below + step
    return f"{below} or {above}" if below > 0 else f"{above}"


def make_plan(target_batch: int, max_micro: int, world_size: int = 1) -> Plan:
    """The exact plan for ``target_batch`` samples per optimizer step.

    Each of ``world_size`` ranks gets ``T = target_batch / world_size`` samples per
    step, split into ``accum_iter = ceil(T / max_micro)`` micro-batches that differ
    by at most one sample (256 with ``max_micro=100`` → 86, 85, 85). The effective
    batch is never changed silently: a target that does not divide among the ranks
    is a :class:`PlanError` naming the nearest targets that do.
    """
    check_count("target_batch", target_batch)
    check_count("max_micro", max_micro)
    check_count("world_size", world_size)
    if target_batch % world_size:
        raise PlanError(
            f"target_batch {target_batch} does not divide evenly among {world_size} ranks, so "
            f"every rank cannot get the same share; use target_batch="
            f"{_nearest_multiples(target_batch, world_size)} (a multiple of {world_size})"
        )
    per_rank = target_batch // world_size
    accum_iter = math.ceil(per_rank / max_micro)
    sizes = even_split(per_rank, accum_iter)
    return Plan(
        target_batch=target_batch,
        world_size=world_size,
        micro_batch=sizes[0],
        accum_iter=accum_iter,
        micro_sizes=sizes,
    )
