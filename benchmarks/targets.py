"""The issue's targets and how each is judged: PASS, MISS (by how much) or not established.

Pure functions of measured figures; every benchmark writes the :class:`Verdict` of its
targets into its JSON, and :mod:`benchmarks.summary` gathers them. A verdict is PASS or
MISS only when the measurement settles it: a share against a stable maximum known only
as a bound is *not established* unless every value the bound allows gives the same
answer (e.g. "at most 94 %" is a MISS of the 97 % target whatever the maximum is).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "CHOICE_SHARE",
    "CHOICE_STEPS",
    "MISS",
    "OPEN",
    "OVERHEAD_LIMIT",
    "PASS",
    "PROBE_TIME_LIMIT",
    "TARGETS",
    "THROUGHPUT_SHARE",
    "Verdict",
    "judge_at_least",
    "judge_at_most",
    "judge_fresh",
    "judge_share",
    "not_established",
    "overall",
]

PASS, MISS, OPEN = "PASS", "MISS", "not established"

CHOICE_SHARE = 0.97  #: autoaccum's choice ≥ this share of the exactly bracketed stable maximum
CHOICE_STEPS = 200  #: ... and no OOM in this many steps in a fresh process at the choice
PROBE_TIME_LIMIT = 0.4  #: probe time ≤ this × Lightning binsearch's
THROUGHPUT_SHARE = 0.99  #: the chosen plan's samples/s ≥ this × the best of the sweep
OVERHEAD_LIMIT = 1.01  #: fit's time per optimizer step ≤ this × the hand-written loop's

#: key → what it asks, in the order the summary shows them
TARGETS: dict[str, str] = {
    "choice_share": f"choice ≥ {CHOICE_SHARE:.0%} of the exactly bracketed stable maximum",
    "choice_fresh": f"no OOM in {CHOICE_STEPS} fresh steps at the choice",
    "probe_time": f"probe time ≤ {PROBE_TIME_LIMIT}× Lightning binsearch",
    "throughput": f"chosen plan's samples/s ≥ {THROUGHPUT_SHARE:.0%} of the sweep's best",
    "overhead": f"fit ≤ {OVERHEAD_LIMIT}× the hand-written loop",
}


@dataclass(frozen=True)
class Verdict:
    status: str  #: PASS, MISS or OPEN ("not established")
    detail: str  #: the figure and the reason, in words
    value: float | None = None  #: the measured figure (a share or a ratio), when there is one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verdict:
        return cls(str(data["status"]), str(data["detail"]), data.get("value"))

    def cell(self) -> str:
        """``PASS: 98.2 % of 562`` — one table cell."""
        return f"{self.status}: {self.detail}"


def not_established(reason: str) -> Verdict:
    return Verdict(OPEN, reason)


def _pct(x: float) -> str:
    return f"{x * 100:.1f} %"


def judge_share(
    choice: int, largest_ok: int | None, smallest_fail: int | None, need: float = CHOICE_SHARE
) -> Verdict:
    """``choice`` against the stable maximum, bracketed by the largest size that trained
    in a fresh process and the smallest that ran out of memory there."""
    ok = largest_ok or 0
    if smallest_fail is not None and choice >= smallest_fail:
        return Verdict(MISS, f"{choice} is above the stable maximum ({smallest_fail} failed fresh)")
    if smallest_fail is not None and smallest_fail == ok + 1:
        share = choice / ok
        if share >= need:
            return Verdict(PASS, f"{_pct(share)} of {ok} (exact)", share)
        gap = (need - share) * 100
        return Verdict(MISS, f"{_pct(share)} of {ok} (exact), {gap:.1f} points short", share)
    if ok == 0:
        return not_established("no size trained in a fresh process")
    best = choice / ok  # the share if the stable maximum is the least it can be
    if best < need:
        gap = (need - best) * 100
        return Verdict(MISS, f"at most {_pct(best)} (stable ≥ {ok}), ≥ {gap:.1f} points short")
    if smallest_fail is None:
        return not_established(f"at most {_pct(best)}: stable maximum only known to be ≥ {ok}")
    worst = choice / (smallest_fail - 1)
    if worst >= need:
        return Verdict(PASS, f"{_pct(worst)}–{_pct(best)} (stable {ok}–{smallest_fail - 1})")
    return not_established(
        f"{_pct(worst)}–{_pct(best)}: stable maximum only bracketed to {ok}–{smallest_fail - 1}"
    )


def judge_fresh(steps: int, ran: bool | None, steps_done: int | None = None) -> Verdict:
    """A fresh run of ``steps`` steps at the choice: True ran them all, False ran out of
    memory (after ``steps_done``), None not run."""
    if ran is None:
        return not_established(f"no {steps}-step fresh run at the choice")
    if ran:
        return Verdict(PASS, f"{steps} steps without OOM")
    at = "" if steps_done is None else f" at step {steps_done + 1}"
    return Verdict(MISS, f"out of memory{at} of {steps}")


def judge_at_most(value: float | None, limit: float, what: str) -> Verdict:
    """``value ≤ limit`` (a ratio like ``0.53×``), MISS saying by how much."""
    if value is None:
        return not_established(f"no {what}")
    if value <= limit:
        return Verdict(PASS, f"{value:.3f}× (≤ {limit}×)", value)
    return Verdict(MISS, f"{value:.3f}× > {limit}×, {(value / limit - 1) * 100:.1f} % over", value)


def judge_at_least(value: float | None, need: float, what: str) -> Verdict:
    """``value ≥ need`` (a share like ``97.6 %``), MISS saying by how many points."""
    if value is None:
        return not_established(f"no {what}")
    if value >= need:
        return Verdict(PASS, f"{_pct(value)} (≥ {_pct(need)})", value)
    return Verdict(
        MISS, f"{_pct(value)} < {_pct(need)}, {(need - value) * 100:.1f} points short", value
    )


def overall(verdicts: Iterable[Verdict]) -> Verdict:
    """One target over every setting: MISS if any missed, PASS if all passed, else open."""
    found = list(verdicts)
    misses = sum(v.status == MISS for v in found)
    passes = sum(v.status == PASS for v in found)
    opened = len(found) - misses - passes
    counts = f"{passes} pass, {misses} miss, {opened} not established"
    if not found:
        return not_established("not measured")
    if misses:
        return Verdict(MISS, counts)
    return Verdict(PASS if not opened else OPEN, counts)
