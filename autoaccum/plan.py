"""The planner: pure arithmetic that turns a micro-batch ceiling into an exact plan."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from autoaccum.errors import PlanError, check_count

__all__ = [
    "Plan",
    "Plans",
    "check_target",
    "compare_with_fit",
    "equal_plan",
    "even_split",
    "make_plan",
    "packed_plan",
    "plans_of",
    "shares",
]


def even_split(total: int, parts: int) -> tuple[int, ...]:
    """``total`` split into ``parts`` sizes that differ by at most one, largest first.

    >>> even_split(256, 3)
    (86, 85, 85)
    """
    base, extra = divmod(total, parts)
    return tuple(base + 1 if i < extra else base for i in range(parts))


def shares(samples: int, world_size: int) -> tuple[int, ...]:
    """``samples`` of a window shared among ``world_size`` ranks as evenly as can be, rank 0
    first: ``shares(10, 3) == (4, 3, 3)``. No sample is repeated to make them equal."""
    return even_split(samples, world_size)


def _split(samples: int, max_micro: int, min_micro: int) -> tuple[int, ...] | None:
    """``samples`` in the fewest micro-batches of at most ``max_micro``, as even as can be,
    none below ``min_micro``; None when no such split exists."""
    parts = math.ceil(samples / max_micro)
    if samples // parts < min_micro:
        return None
    return even_split(samples, parts)


@dataclass(frozen=True)
class Plan:
    """How one optimizer step's ``target_batch`` samples are laid out on rank ``rank``.

    A window's samples are shared among the ``world_size`` ranks as evenly as they go
    (:func:`shares`: ranks may hold one sample more or less; no sample is repeated), so
    rank ``rank`` holds ``per_rank`` of them and ``micro_sizes`` are its micro-batches:
    ``sum(micro_sizes) == per_rank``. ``micro_batch`` is the largest of them; ``max_micro``
    the ceiling the plan was made under (the probe's or the user's, this rank's); ``min_micro``
    the smallest micro-batch the model can train on (2 with BatchNorm, which cannot normalise
    one sample). ``rank_sizes``, where known, holds every rank's ``micro_sizes`` (each rank
    plans under its own ceiling).
    """

    target_batch: int
    world_size: int
    micro_batch: int
    accum_iter: int
    micro_sizes: tuple[int, ...]
    max_micro: int
    min_micro: int = 1
    rank: int = 0
    rank_sizes: tuple[tuple[int, ...], ...] = ()
    #: with ``target_tokens``: the window's loss tokens (over all ranks); ``micro_sizes`` are
    #: then this rank's samples per micro-batch in a window (packed by length), ``target_batch``
    #: their sum
    tokens: int = 0
    #: with ``target_tokens``: the micro-batches' budget in padded tokens (samples × the
    #: longest of them)
    budget: int = 0
    #: with ``target_tokens``: ``micro_sizes`` are a window's packing (False: the ceiling only,
    #: before any window was packed)
    packed: bool = False

    @property
    def per_rank(self) -> int:
        """Samples this rank processes per optimizer step (its share of a full window)."""
        return shares(self.target_batch, self.world_size)[self.rank]

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
        for kept in range(samples, max(self.min_micro, 1) - 1, -1):
            sizes = _split(kept, self.micro_batch, self.min_micro)
            if sizes is not None:
                return sizes
        return ()

    def describe(self) -> str:
        """One line, e.g. ``target_batch 256 = 86+85+85 (accum_iter 3) × 1 rank``, or, where
        the ranks' splits differ, ``target_batch 10 = rank 0: 3+2, rank 1: 5``."""
        if self.tokens:
            head = f"target_tokens {self.tokens} = micro-batches of at most {self.budget:,} padded"
            if not self.packed:
                return f"{head} tokens, each window's samples packed longest first"
            return f"{head} tokens (packed: {_sizes(self.micro_sizes)} samples)"
        every = self.rank_sizes or self._every_rank()
        if len(set(every)) > 1:
            split = ", ".join(f"rank {r}: {_sizes(s)}" for r, s in enumerate(every))
            return f"target_batch {self.target_batch} = {split}"
        ranks = "rank" if self.world_size == 1 else "ranks"
        return (
            f"target_batch {self.target_batch} = {_sizes(self.micro_sizes)} (accum_iter "
            f"{self.accum_iter}) × {self.world_size} {ranks}"
        )

    def under(self, max_micro: int) -> Plan:
        """The plan for the same target, ranks and model under another ceiling."""
        return make_plan(
            self.target_batch,
            max_micro,
            self.world_size,
            min_micro=self.min_micro,
            rank=self.rank,
        )

    def _every_rank(self) -> tuple[tuple[int, ...], ...]:
        """Every rank's micro-batches under this plan's ceiling (where each rank's is unknown)."""
        if self.world_size == 1 or self.target_batch % self.world_size == 0:
            return (self.micro_sizes,) * self.world_size
        return tuple(
            _split(share, min(self.max_micro, share), self.min_micro) or ()
            for share in shares(self.target_batch, self.world_size)
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
            "rank": self.rank,
            "rank_sizes": [list(s) for s in self.rank_sizes],
            "tokens": self.tokens,
            "budget": self.budget,
            "packed": self.packed,
        }


def _sizes(micro_sizes: tuple[int, ...]) -> str:
    if len(set(micro_sizes)) == 1:
        return f"{micro_sizes[0]} × {len(micro_sizes)}"
    return "+".join(str(s) for s in micro_sizes) if micro_sizes else "nothing"


#: Window k's plan, window by window (a target that changes along the run has one per size).
Plans = Callable[[int], Plan]


def plans_of(plans: Plan | Plans) -> Plans:
    """``plans`` as window k → its plan (one plan for every window, or a function)."""
    if isinstance(plans, Plan):
        return lambda index: plans
    return plans


def packed_plan(
    sizes: tuple[int, ...], tokens: int, budget: int, min_micro: int = 1, *, packed: bool = True
) -> Plan:
    """One rank's plan of a window of ``tokens`` loss tokens whose samples were packed into
    micro-batches of ``sizes`` under ``budget`` padded tokens (none: one empty micro-step);
    ``packed=False``: ``sizes`` is only the ceiling, before any window was packed."""
    sizes = sizes or (0,)
    return Plan(
        target_batch=max(1, sum(sizes)),
        world_size=1,
        micro_batch=max(1, max(sizes)),
        accum_iter=len(sizes),
        micro_sizes=sizes,
        max_micro=max(1, max(sizes)),
        min_micro=min_micro,
        tokens=tokens,
        budget=budget,
        packed=packed,
    )


def _nearest(value: int, ok: list[int]) -> str:
    below = [v for v in ok if v < value]
    above = [v for v in ok if v > value]
    near = ([max(below)] if below else []) + ([min(above)] if above else [])
    return " or ".join(str(v) for v in near)


def check_target(
    target_batch: int, world_size: int = 1, *, min_micro: int = 1, equal: bool = False
) -> int:
    """``target_batch`` when its windows can be shared among ``world_size`` ranks: every rank
    holds at least ``min_micro`` samples of a full window, and, with ``equal`` (loops that
    need every rank's share alike: Lightning, the Trainer), the target divides evenly. Else a
    :class:`PlanError` naming the nearest targets that work."""
    check_count("target_batch", target_batch)
    check_count("world_size", world_size)
    check_count("min_micro", min_micro)
    if equal and target_batch % world_size:
        valid = [world_size * k for k in range(1, target_batch // world_size + 2)]
        raise PlanError(
            f"target_batch {target_batch} does not divide evenly among {world_size} ranks, so "
            f"every rank cannot get the same share; use target_batch="
            f"{_nearest(target_batch, valid)} (a multiple of {world_size})"
        )
    if min(shares(target_batch, world_size)) < min_micro:
        least = world_size * min_micro
        held = "no sample" if target_batch < world_size else f"fewer than {min_micro} samples"
        raise PlanError(
            f"target_batch {target_batch} shared among {world_size} ranks leaves a rank {held} "
            f"per window{' (BatchNorm needs at least 2)' if min_micro > 1 else ''}; use "
            f"target_batch ≥ {least}"
        )
    return target_batch


@functools.lru_cache(maxsize=1024)  # pure, and asked for at every window
def make_plan(
    target_batch: int,
    max_micro: int,
    world_size: int = 1,
    *,
    min_micro: int = 1,
    rank: int = 0,
) -> Plan:
    """The exact plan for ``target_batch`` samples per optimizer step, on rank ``rank``.

    A window's samples are shared among the ``world_size`` ranks as evenly as they go
    (:func:`shares`: 10 on 3 ranks → 4, 3, 3; the target need not divide), and this rank's
    share ``T`` is split into ``accum_iter = ceil(T / max_micro)`` micro-batches that differ by
    at most one sample (256 with ``max_micro=100`` → 86, 85, 85). The effective batch is never
    changed silently: a target that would leave a rank without a sample, or that would need a
    micro-batch below ``min_micro`` (a BatchNorm model cannot train on one sample), is a
    :class:`PlanError` naming the nearest targets that work.
    """
    check_target(target_batch, world_size, min_micro=min_micro)
    check_count("max_micro", max_micro)
    check_count("rank", rank, minimum=0)
    if rank >= world_size:
        raise PlanError(f"rank {rank} is out of range for world_size {world_size}")
    if max_micro < min_micro:
        raise PlanError(
            f"max_micro {max_micro} is below {min_micro}, the smallest micro-batch this model "
            f"can train on (BatchNorm needs at least 2 samples to normalise); pass "
            f"max_micro ≥ {min_micro}"
        )
    per_rank = shares(target_batch, world_size)[rank]
    sizes = _split(per_rank, min(max_micro, per_rank), min_micro)
    if sizes is None:

        def works(target: int) -> bool:
            share = shares(target, world_size)[rank]
            return (
                share >= min_micro and _split(share, min(max_micro, share), min_micro) is not None
            )

        span = range(world_size, target_batch + world_size * (2 * min_micro + 2))
        valid = [t for t in span if works(t)]
        raise PlanError(
            f"target_batch {target_batch} ({per_rank} on rank {rank}) cannot be split into "
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
        rank=rank,
    )


def equal_plan(target_batch: int, max_micro: int, world_size: int = 1, min_micro: int = 1) -> Plan:
    """The plan with equal micro-batches, for loops that need them (Lightning, the Transformers
    Trainer): the largest divisor of the per-rank share that is at most ``max_micro`` (and at
    least ``min_micro``). ``plan.max_micro`` stays the ceiling. The target must divide among
    the ranks (their samplers give every rank the same share)."""
    check_target(target_batch, world_size, min_micro=min_micro, equal=True)
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
