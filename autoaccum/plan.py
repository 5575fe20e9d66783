"""The planner: pure arithmetic that turns a micro-batch ceiling into an exact plan."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

from autoaccum.errors import PlanError, check_count

__all__ = ["Plan", "check_target", "compare_with_fit", "equal_plan", "even_split", "make_plan"]


def even_split(total: int, parts: int) -> tuple[int, ...]:
    """``total`` split into ``parts`` sizes that differ by at most one, largest first.

    >>> even_split(256, 3)
    (86, 85, 85)
    """
    base, extra = divmod(total, parts)
    return tuple(base + 1 if i < extra else base for i in range(parts))


def _split(samples: int, max_micro: int, min_micro: int) -> tuple[int, ...] | None:
    """``samples`` in the fewest micro-batches of at most ``max_micro``, as even as can be,
    none below ``min_micro``; None when no such split exists."""
    parts = math.ceil(samples / max_micro)
    if samples // parts < min_micro:
        return None
    return even_split(samples, parts)


@dataclass(frozen=True)
class Plan:
    """How one optimizer step's ``target_batch`` samples are laid out.

    ``micro_sizes`` are one rank's micro-batches in one window, so
    ``sum(micro_sizes) * world_size == target_batch`` always holds. ``micro_batch`` is the
    largest of them; ``max_micro`` the ceiling the plan was made under (the probe's or the
    user's); ``min_micro`` the smallest micro-batch the model can train on (2 with
    BatchNorm, which cannot normalise one sample).
    """

    target_batch: int
    world_size: int
    micro_batch: int
    accum_iter: int
    micro_sizes: tuple[int, ...]
    max_micro: int
    min_micro: int = 1

    @property
    def per_rank(self) -> int:
        """Samples each rank processes per optimizer step."""
        return self.target_batch // self.world_size

    def window_sizes(self, samples: int) -> tuple[int, ...]:
        """Micro sizes for a (possibly short, last) window of ``samples`` on one rank.

        A full window gives ``micro_sizes``; a short one is split as evenly as the full one
        would be, into no more micro-batches than needed. When a short window cannot be
        split without a micro-batch below ``min_micro`` (e.g. 5 samples at most 2 at a time
        on a BatchNorm model), the sizes cover all but the fewest samples that make it
        possible: ``sum(sizes) < samples`` then, and the caller drops the rest, saying so.
        """
        if samples == self.per_rank:
            return self.micro_sizes
        for kept in range(samples, self.min_micro - 1, -1):
            sizes = _split(kept, self.micro_batch, self.min_micro)
            if sizes is not None:
                return sizes
        return ()

    def describe(self) -> str:
        """One line, e.g. ``target_batch 256 = 86+85+85 (accum_iter 3) × 1 rank``."""
        if len(set(self.micro_sizes)) == 1:
            sizes = f"{self.micro_sizes[0]} × {self.accum_iter}"
        else:
            sizes = "+".join(str(s) for s in self.micro_sizes)
        ranks = "rank" if self.world_size == 1 else "ranks"
        return (
            f"target_batch {self.target_batch} = {sizes} (accum_iter {self.accum_iter}) "
            f"× {self.world_size} {ranks}"
        )

    def __repr__(self) -> str:
        least = f", min_micro {self.min_micro}" if self.min_micro > 1 else ""
        return f"Plan({self.describe()}; max_micro {self.max_micro}{least})"

    def to_dict(self) -> dict[str, object]:
        return {
            "target_batch": self.target_batch,
            "world_size": self.world_size,
            "micro_batch": self.micro_batch,
            "accum_iter": self.accum_iter,
            "micro_sizes": list(self.micro_sizes),
            "max_micro": self.max_micro,
            "min_micro": self.min_micro,
        }


def _nearest(value: int, ok: list[int]) -> str:
    below = [v for v in ok if v < value]
    above = [v for v in ok if v > value]
    near = ([max(below)] if below else []) + ([min(above)] if above else [])
    return " or ".join(str(v) for v in near)


def check_target(target_batch: int, world_size: int = 1) -> int:
    """``target_batch`` when it divides evenly among ``world_size`` ranks (every rank must get
    the same share), else a :class:`PlanError` naming the nearest targets that do."""
    check_count("target_batch", target_batch)
    check_count("world_size", world_size)
    if target_batch % world_size:
        valid = [world_size * k for k in range(1, target_batch // world_size + 2)]
        raise PlanError(
            f"target_batch {target_batch} does not divide evenly among {world_size} ranks, so "
            f"every rank cannot get the same share; use target_batch="
            f"{_nearest(target_batch, valid)} (a multiple of {world_size})"
        )
    return target_batch


def make_plan(
    target_batch: int, max_micro: int, world_size: int = 1, *, min_micro: int = 1
) -> Plan:
    """The exact plan for ``target_batch`` samples per optimizer step.

    Each of ``world_size`` ranks gets ``T = target_batch / world_size`` samples per step,
    split into ``accum_iter = ceil(T / max_micro)`` micro-batches that differ by at most one
    sample (256 with ``max_micro=100`` → 86, 85, 85). The effective batch is never changed
    silently: a target that does not divide among the ranks, or that would need a
    micro-batch below ``min_micro`` (a BatchNorm model cannot train on one sample), is a
    :class:`PlanError` naming the nearest targets that work.
    """
    check_target(target_batch, world_size)
    check_count("max_micro", max_micro)
    check_count("min_micro", min_micro)
    if max_micro < min_micro:
        raise PlanError(
            f"max_micro {max_micro} is below {min_micro}, the smallest micro-batch this model "
            f"can train on (BatchNorm needs at least 2 samples to normalise); pass "
            f"max_micro ≥ {min_micro}"
        )
    per_rank = target_batch // world_size
    sizes = _split(per_rank, min(max_micro, per_rank), min_micro)
    if sizes is None:

        def works(target: int) -> bool:
            share = target // world_size
            return (
                share >= min_micro and _split(share, min(max_micro, share), min_micro) is not None
            )

        span = range(world_size, target_batch + world_size * (2 * min_micro + 2), world_size)
        valid = [t for t in span if works(t)]
        raise PlanError(
            f"target_batch {target_batch} ({per_rank} per rank) cannot be split into "
            f"micro-batches of {min_micro} to {max_micro} samples: one would hold fewer than "
            f"{min_micro}, which this model cannot train on (BatchNorm needs at least 2 samples "
            f"to normalise). Use target_batch={_nearest(target_batch, valid)}"
        )
    return Plan(
        target_batch=target_batch,
        world_size=world_size,
        micro_batch=sizes[0],
        accum_iter=len(sizes),
        micro_sizes=sizes,
        max_micro=max_micro,
        min_micro=min_micro,
    )


def equal_plan(target_batch: int, max_micro: int, world_size: int = 1, min_micro: int = 1) -> Plan:
    """The plan with equal micro-batches, for loops that need them (Lightning, the Transformers
    Trainer): the largest divisor of the per-rank share that is at most ``max_micro`` (and at
    least ``min_micro``). ``plan.max_micro`` stays the ceiling."""
    fit_plan = make_plan(target_batch, max_micro, world_size, min_micro=min_micro)
    share = fit_plan.per_rank

    def divisor(n: int) -> int | None:
        return next((d for d in range(min(max_micro, n), min_micro - 1, -1) if n % d == 0), None)

    micro = divisor(share)
    if micro is None:  # only with min_micro 2: a prime share above the ceiling
        below = next((s for s in range(share - 1, 0, -1) if divisor(s)), None)
        above = next(s for s in itertools.count(share + 1) if divisor(s))
        near = " or ".join(str(s * world_size) for s in (below, above) if s is not None)
        raise PlanError(
            f"the per-rank share {share} of target_batch {target_batch} has no divisor from "
            f"{min_micro} to {max_micro}, and equal micro-batches of one sample cannot train "
            f"this model (BatchNorm); use target_batch={near}"
        )
    return replace(
        make_plan(target_batch, micro, world_size, min_micro=min_micro), max_micro=max_micro
    )


def compare_with_fit(plan: Plan, host: str) -> str:
    """How the equal-split ``plan`` compares with what ``autoaccum.fit`` would run, in words
    (for the integrations with loops that need equal micro-batches: Lightning, the Trainer)."""
    fit_plan = make_plan(
        plan.target_batch, plan.max_micro, plan.world_size, min_micro=plan.min_micro
    )
    head = f"per-device share {plan.per_rank}, ceiling {plan.max_micro}"
    if plan.micro_batch == fit_plan.micro_batch:
        return f"{head}: {plan.micro_batch} × {plan.accum_iter}, as autoaccum.fit would run it"
    fit_sizes = "+".join(map(str, fit_plan.micro_sizes))
    return (
        f"{head}: {host} needs equal micro-batches, so {plan.micro_batch} × {plan.accum_iter} "
        f"(autoaccum.fit would use {fit_sizes}): {fit_plan.micro_batch - plan.micro_batch} "
        f"samples fewer per micro-batch, {plan.accum_iter - fit_plan.accum_iter} more "
        "micro-steps per optimizer step"
    )
