"""Targets that change along the run: a batch (or token budget) per optimizer step.

A target is a whole number, the same at every step, or a *schedule*: any callable
``f(step) -> int`` of the optimizer steps done so far (0 for the first step), such as
:class:`Ramp`. The plan is made anew whenever the target changes (the probed ceiling stays),
every step is exact at its own size, and a checkpoint carries the position, so a resume
mid-ramp continues as if nothing had stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from autoaccum.errors import ConfigError, check_count

__all__ = [
    "Ramp",
    "Schedule",
    "as_schedule",
    "constant",
    "describe_target",
    "fingerprint",
    "largest",
]

#: What a target may be: a whole number, or a schedule ``f(step) -> int``.
Schedule = Callable[[int], int]


@dataclass(frozen=True)
class Ramp:
    """A target that grows (or shrinks) linearly from ``start`` to ``end`` over the first
    ``steps`` optimizer steps, then stays at ``end``: step ``s`` (0-based) trains
    ``round(start + (end - start) · s / steps)``. Any whole sizes: no divisibility needed
    (``Ramp(16, 100, 7)``: 16, 28, 40, 52, 64, 76, 88, then 100)."""

    start: int
    end: int
    steps: int

    def __post_init__(self) -> None:
        check_count("start", self.start)
        check_count("end", self.end)
        check_count("steps", self.steps)

    def __call__(self, step: int) -> int:
        if step >= self.steps:
            return self.end
        # half up, on exact fractions: the same on every machine
        return self.start + ((self.end - self.start) * step * 2 + self.steps) // (2 * self.steps)

    def __repr__(self) -> str:
        return f"Ramp({self.start} → {self.end} over {self.steps} steps)"


class _Constant:
    """A fixed target, as a schedule."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __call__(self, step: int) -> int:
        return self.value

    def __repr__(self) -> str:
        return str(self.value)


def as_schedule(target: object, name: str = "target_batch") -> Schedule:
    """``target`` (a whole number or a schedule) as a schedule; a number is checked now, a
    schedule's values at every step they are asked for (:func:`target_at`)."""
    if isinstance(target, (Ramp, _Constant)):
        return target
    if callable(target) and not isinstance(target, type):
        return _Checked(target, name)
    return _Constant(check_count(name, target))


class _Checked:
    """A user's schedule whose every value is checked when it is asked for."""

    def __init__(self, schedule: Schedule, name: str) -> None:
        self.schedule = schedule
        self.name = name

    def __call__(self, step: int) -> int:
        try:
            value = self.schedule(step)
        except Exception as exc:
            raise ConfigError(
                f"the {self.name} schedule raised {type(exc).__name__} at step {step}: {exc}; a "
                f"schedule is a function of the optimizer steps done (0, 1, 2, …) returning a "
                "whole number ≥ 1"
            ) from exc
        try:
            return check_count(self.name, value)
        except ConfigError as err:
            raise ConfigError(
                f"the {self.name} schedule gave {value!r} at step {step}: {err}"
            ) from None

    def __repr__(self) -> str:
        return getattr(self.schedule, "__name__", repr(self.schedule))


def constant(schedule: Schedule) -> int | None:
    """The schedule's value when it is a fixed number, else None."""
    return schedule.value if isinstance(schedule, _Constant) else None


def describe_target(schedule: Schedule) -> str:
    """The target in words: ``256``, ``Ramp(16 → 100 over 7 steps)``, ``a schedule (f)``."""
    if isinstance(schedule, (_Constant, Ramp)):
        return repr(schedule)
    return f"a schedule ({schedule!r})"


def largest(schedule: Schedule, steps: int = 4096) -> int:
    """The largest target ``schedule`` gives (over its first ``steps`` steps, where it is
    not a fixed number or a ramp): what the probe tries up to."""
    if isinstance(schedule, _Constant):
        return schedule.value
    if isinstance(schedule, Ramp):
        return max(schedule.start, schedule.end)
    return max(schedule(step) for step in range(steps))


def fingerprint(schedule: Schedule, steps: int = 16) -> tuple[int, ...]:
    """The first ``steps`` values (to check that every rank was given the same schedule)."""
    return tuple(schedule(step) for step in range(steps))
