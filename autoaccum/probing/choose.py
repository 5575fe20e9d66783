"""The fastest plan: which micro-batch under the ceiling gives the most samples per second.

The largest micro-batch that fits is not always the fastest: a plan of 86+85+85 can run
slower than 64 × 4 (kernel shapes, cache behaviour, the allocator near its limit). This
module decides from measured timings; it never touches a device. The pieces:

* :func:`plan_sizes` / :func:`candidate_sizes`: the sizes worth timing. Only the largest
  micro-batch of some plan counts (``make_plan(per_rank, m).micro_batch`` for ``m`` up to
  the ceiling): for 256 samples under a ceiling of 100 those are 86, 64, 52, 43, ...;
  timing 80 would say nothing new, since ``make_plan(256, 80)`` is 64 × 4.
* :func:`time_call` / :func:`time_sizes`: seconds per micro-step at a size, from a callable
  that runs one micro-step, with warm-up and a caller-supplied device sync.
* :func:`predict`: each plan's samples/s: a window costs the time of each of its
  micro-batches plus one optimizer step.
* :func:`choose_fastest`: the fastest plan, preferring the smaller micro-batch when two are
  within ``tolerance`` of each other (timing noise; the smaller one leaves memory spare for
  a longer batch), as a frozen :class:`Choice` with every candidate's rate and the reason.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from autoaccum.errors import ConfigError, check_count, check_fraction
from autoaccum.plan import Plan, make_plan

__all__ = [
    "DEFAULT_NEAR",
    "DEFAULT_TOLERANCE",
    "Choice",
    "PlanRate",
    "candidate_sizes",
    "choose_fastest",
    "describe_sizes",
    "plan_sizes",
    "predict",
    "time_call",
    "time_sizes",
]

#: How many of the largest plan sizes under the ceiling are timed.
DEFAULT_NEAR = 3
#: Plans within this share of the fastest count as equally fast (the smaller one is chosen).
#: 1 %: a choice made within it can still meet a "≥ 99 % of the best" throughput target.
DEFAULT_TOLERANCE = 0.01


def plan_sizes(per_rank: int, ceiling: int, min_micro: int = 1) -> tuple[int, ...]:
    """Every distinct ``make_plan(per_rank, m, min_micro=min_micro).micro_batch`` for
    ``min_micro ≤ m ≤ ceiling``, largest first.

    >>> plan_sizes(256, 100)[:5]
    (86, 64, 52, 43, 37)
    """
    check_count("per_rank", per_rank)
    check_count("ceiling", ceiling)
    check_count("min_micro", min_micro)
    top = min(ceiling, per_rank)
    sizes: list[int] = []
    for parts in range(-(-per_rank // top), per_rank + 1):
        if per_rank // parts < min_micro:  # a micro-batch would hold fewer than min_micro
            break
        size = -(-per_rank // parts)
        if not sizes or size != sizes[-1]:
            sizes.append(size)
    return tuple(sizes)


def candidate_sizes(
    per_rank: int,
    ceiling: int,
    min_micro: int = 1,
    *,
    near: int = DEFAULT_NEAR,
    fractions: Sequence[float] = (0.5,),
) -> tuple[int, ...]:
    """The sizes worth timing, largest first: the ``near`` largest plan sizes under
    ``ceiling``, plus the plan size nearest each ``fraction`` of the largest one.

    >>> candidate_sizes(256, 100)
    (86, 64, 52, 43)
    """
    check_count("near", near)
    sizes = plan_sizes(per_rank, ceiling, min_micro)
    picked = set(sizes[:near])
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ConfigError(f"fractions must lie in (0, 1], got {fraction}")
        if sizes:
            want = sizes[0] * fraction
            picked.add(min(sizes, key=lambda s: (abs(s - want), -s)))
    return tuple(sorted(picked, reverse=True))


def time_call(
    run: Callable[[], object],
    *,
    warmup: int = 1,
    repeats: int = 3,
    sync: Callable[[], object] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Seconds per call of ``run``: ``warmup`` calls untimed, then ``repeats`` calls timed
    as one block between two ``sync()`` calls (so the device is not stalled between calls,
    as in training, and queued work is counted once it has finished)."""
    check_count("warmup", warmup, minimum=0)
    check_count("repeats", repeats)
    for _ in range(warmup):
        run()
    if sync is not None:
        sync()
    start = clock()
    for _ in range(repeats):
        run()
    if sync is not None:
        sync()
    return (clock() - start) / repeats


def time_sizes(
    run_at: Callable[[int], object],
    sizes: Iterable[int],
    *,
    warmup: int = 1,
    repeats: int = 3,
    sync: Callable[[], object] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[int, float]:
    """``{size: seconds per micro-step}`` for each size, ``run_at(size)`` running one
    micro-step (forward and backward, gradients accumulating) at that size."""
    return {
        size: time_call(
            functools.partial(run_at, size), warmup=warmup, repeats=repeats, sync=sync, clock=clock
        )
        for size in sizes
    }


def describe_sizes(sizes: Sequence[int]) -> str:
    """``64 × 4``, ``86+85+85`` (up to four micro-batches), else ``7 × 4 + 6 × 6``."""
    if len(set(sizes)) == 1:
        return f"{sizes[0]} × {len(sizes)}"
    if len(sizes) <= 4:
        return "+".join(str(s) for s in sizes)
    runs = [(s, len(list(group))) for s, group in itertools.groupby(sizes)]
    return " + ".join(f"{s} × {n}" if n > 1 else str(s) for s, n in runs)


@dataclass(frozen=True)
class PlanRate:
    """One candidate plan and its predicted speed."""

    micro_sizes: tuple[int, ...]
    window_seconds: float
    """Σ seconds of its micro-steps + one optimizer step."""
    samples_per_s: float
    estimated: bool
    """Some micro size was not timed itself but scaled from the nearest timed size."""

    @property
    def micro_batch(self) -> int:
        return self.micro_sizes[0]

    @property
    def accum_iter(self) -> int:
        return len(self.micro_sizes)

    def describe(self) -> str:
        """``64 × 4``, ``86+85+85``, or ``7 × 4 + 6 × 6`` for longer uneven plans."""
        return describe_sizes(self.micro_sizes)

    def to_dict(self) -> dict[str, object]:
        return {
            "micro_sizes": list(self.micro_sizes),
            "window_seconds": self.window_seconds,
            "samples_per_s": self.samples_per_s,
            "estimated": self.estimated,
        }


@dataclass(frozen=True)
class Choice:
    """The chosen plan, every candidate's predicted rate (largest micro-batch first) and why."""

    plan: Plan
    samples_per_s: float
    rates: tuple[PlanRate, ...]
    tolerance: float
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {
            "plan": self.plan.to_dict(),
            "samples_per_s": self.samples_per_s,
            "rates": [r.to_dict() for r in self.rates],
            "tolerance": self.tolerance,
            "reason": self.reason,
        }


def _seconds_at(size: int, micro_seconds: Mapping[int, float]) -> tuple[float, bool]:
    """Seconds of one micro-step at ``size``: measured, or scaled per sample from the
    nearest timed size (the larger one on a tie); True when scaled."""
    if size in micro_seconds:
        return micro_seconds[size], False
    near = min(micro_seconds, key=lambda s: (abs(s - size), -s))
    return micro_seconds[near] * size / near, True


def _check_timings(micro_seconds: Mapping[int, float], step_seconds: float) -> None:
    if not micro_seconds:
        raise ConfigError("micro_seconds is empty: time at least one candidate size")
    for size, seconds in micro_seconds.items():
        check_count("a timed size", size)
        if not (math.isfinite(seconds) and seconds > 0):
            raise ConfigError(f"the time at size {size} must be a positive number, got {seconds}")
    if not (math.isfinite(step_seconds) and step_seconds >= 0):
        raise ConfigError(f"step_seconds must be a number ≥ 0, got {step_seconds}")


def predict(
    per_rank: int,
    micro_seconds: Mapping[int, float],
    *,
    step_seconds: float = 0.0,
    min_micro: int = 1,
) -> tuple[PlanRate, ...]:
    """The predicted samples/s of ``make_plan(per_rank, m)`` for every timed size ``m``
    (one entry per distinct plan, largest micro-batch first): a window costs the time at
    each of its micro sizes plus ``step_seconds`` (one optimizer step)."""
    _check_timings(micro_seconds, step_seconds)
    rates: dict[tuple[int, ...], PlanRate] = {}
    for size in sorted(micro_seconds, reverse=True):
        sizes = make_plan(per_rank, size, min_micro=min_micro).micro_sizes
        if sizes in rates:
            continue
        parts = [_seconds_at(s, micro_seconds) for s in sizes]
        window = sum(seconds for seconds, _ in parts) + step_seconds
        estimated = any(scaled for _, scaled in parts)
        rates[sizes] = PlanRate(sizes, window, per_rank / window, estimated)
    return tuple(sorted(rates.values(), key=lambda r: r.micro_batch, reverse=True))


def _rate(samples_per_s: float) -> str:
    """``2 214`` (a space between thousands), or three significant digits below 100."""
    if samples_per_s >= 100:
        return f"{samples_per_s:,.0f}".replace(",", " ")
    return f"{samples_per_s:.3g}"


def _slower(other: PlanRate, than: PlanRate) -> str:
    return f"{(1 - other.samples_per_s / than.samples_per_s) * 100:.1f} % slower"


def _reason(chosen: PlanRate, fastest: PlanRate, rates: tuple[PlanRate, ...]) -> str:
    head = f"chose {chosen.describe()}: {_rate(chosen.samples_per_s)} samples/s"
    if len(rates) == 1:
        return f"{head}, the only candidate"
    if chosen is not fastest:
        gap = (1 - chosen.samples_per_s / fastest.samples_per_s) * 100
        return (
            f"{head}, within {gap:.1f} % of the fastest, {fastest.describe()} "
            f"({_rate(fastest.samples_per_s)}); the smaller micro-batch leaves memory spare"
        )
    largest = rates[0]
    other = largest if chosen is not largest else max(rates[1:], key=lambda r: r.samples_per_s)
    return (
        f"{head}; {other.describe()} would give {_rate(other.samples_per_s)} "
        f"({_slower(other, chosen)})"
    )


def choose_fastest(
    per_rank: int,
    ceiling: int,
    micro_seconds: Mapping[int, float],
    *,
    step_seconds: float = 0.0,
    min_micro: int = 1,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Choice:
    """The plan with the most samples/s among the timed sizes, all at most ``ceiling``.

    ``per_rank`` is one rank's share of the target batch. ``micro_seconds`` maps a
    micro-batch size to the seconds of one micro-step (forward and backward, gradients
    accumulating) at that size; ``step_seconds`` is one optimizer step. Every plan within
    ``tolerance`` of the fastest counts as equally fast, and the one with the smallest
    micro-batch among them is chosen (it leaves memory for a longer batch). ``choice.plan``
    is the plan for ``per_rank`` samples on one rank whose ``max_micro`` is the chosen
    micro-batch (the probe's ceiling stays the probe's ``max_micro``).
    """
    check_count("ceiling", ceiling)
    check_count("min_micro", min_micro)
    tol = check_fraction("tolerance", tolerance, below=1.0, default=DEFAULT_TOLERANCE)
    _check_timings(micro_seconds, step_seconds)
    outside = sorted(s for s in micro_seconds if not min_micro <= s <= ceiling)
    if outside:
        raise ConfigError(
            f"timed sizes {outside} lie outside [{min_micro}, {ceiling}] (min_micro, ceiling): "
            "time only sizes that fit"
        )
    rates = predict(per_rank, micro_seconds, step_seconds=step_seconds, min_micro=min_micro)
    fastest = max(rates, key=lambda r: (r.samples_per_s, -r.micro_batch))
    floor = fastest.samples_per_s * (1 - tol)
    chosen = min((r for r in rates if r.samples_per_s >= floor), key=lambda r: r.micro_batch)
    plan = make_plan(per_rank, chosen.micro_batch, min_micro=min_micro)
    return Choice(plan, chosen.samples_per_s, rates, tol, _reason(chosen, fastest, rates))
