"""Pure arithmetic on the trials' peak memory: the peak line, the size for a budget, the margin.

Nothing here touches a device; every function takes trial records (or numbers) and
returns numbers, so the search, the probe's margin and the memory explanation share
one reading of the same measurements.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

from autoaccum.errors import check_fraction
from autoaccum.results import PeakLine, TrialRecord

__all__ = [
    "DEFAULT_MARGIN",
    "TopReading",
    "apply_margin",
    "check_margin",
    "peak_line",
    "peak_points",
    "size_for_budget",
]

#: Share of the device's memory :func:`autoaccum.probe` keeps spare at the chosen size (see
#: :func:`apply_margin`; a share of the samples where memory is not measured).
DEFAULT_MARGIN = 0.02


def check_margin(margin: object) -> float:
    """``margin`` as a float in [0, 0.5), or a :class:`~autoaccum.errors.ConfigError`."""
    return check_fraction("margin", margin, below=0.5, default=DEFAULT_MARGIN)


def peak_points(trials: Iterable[TrialRecord]) -> list[tuple[int, int]]:
    """(size, peak allocated bytes) of every passing trial that measured its peak."""
    return [(t.size, t.peak_allocated) for t in trials if t.passed and t.peak_allocated is not None]


def peak_line(trials: Iterable[TrialRecord]) -> PeakLine | None:
    """The line ``peak_allocated(b) = fixed + per_sample · b`` over the passing trials.

    None when fewer than two distinct sizes passed with a peak measured (a CPU without an
    emulated device records no peaks). Computed in exact rational arithmetic, so peaks that
    lie on a line give that line exactly.
    """
    points = peak_points(trials)
    if len({size for size, _ in points}) < 2:
        return None
    n = len(points)
    sx = sum(s for s, _ in points)
    sy = sum(p for _, p in points)
    sxx = sum(s * s for s, _ in points)
    sxy = sum(s * p for s, p in points)
    slope = Fraction(n * sxy - sx * sy, n * sxx - sx * sx)
    intercept = Fraction(sy, n) - slope * Fraction(sx, n)
    residuals = [p - (intercept + slope * s) for s, p in points]
    ss_res = sum(r * r for r in residuals)
    mean = Fraction(sy, n)
    ss_tot = sum((p - mean) ** 2 for _, p in points)
    r2 = 1.0 if ss_tot == 0 else float(1 - ss_res / ss_tot)
    return PeakLine(
        fixed=float(intercept),
        per_sample=float(slope),
        r2=r2,
        max_residual=float(max(abs(r) for r in residuals)),
        points=tuple(points),
    )


def size_for_budget(trials: Iterable[TrialRecord], budget: float) -> int | None:
    """The largest size whose peak of live tensors stays within ``budget`` bytes,
    extrapolated along the line through the two largest passing trials; ``None`` without
    two readings.

    Live (allocated) bytes, not reserved ones: they grow in proportion to the batch,
    while the allocator's reserve saturates near the limit as it recycles its cache.
    """
    peaks = dict(peak_points(trials))
    if len(peaks) < 2:
        return None
    (s1, m1), (s2, m2) = sorted(peaks.items())[-2:]
    slope = (m2 - m1) / (s2 - s1)
    if slope <= 0:
        return None
    return s2 + math.floor((budget - m2) / slope)


@dataclass(frozen=True)
class TopReading:
    """What the probe measured at its largest passing size, for :func:`apply_margin`."""

    limit: int  #: bytes the process may hold on the device
    peak: int  #: bytes reserved at the peak of the largest passing trial
    per_sample: float  #: bytes each sample adds (least squares over the passing trials)

    @classmethod
    def of(
        cls, trials: tuple[TrialRecord, ...], largest_pass: int, limit: int | None
    ) -> TopReading | None:
        """``None`` where memory was not measured or one size alone passed."""
        line = peak_line(trials)
        top = [t for t in trials if t.passed and t.size == largest_pass]
        if limit is None or line is None or line.per_sample <= 0 or not top:
            return None
        peak = top[-1].peak_reserved
        return None if peak is None else cls(limit, peak, line.per_sample)


def apply_margin(
    largest_pass: int,
    *,
    margin: float,
    hit_limit: bool,
    lower: int = 1,
    top: TopReading | None = None,
) -> int:
    """The ceiling to plan with: ``largest_pass`` less what keeps ``margin`` spare.

    Why a margin at all: a size that passes a few trial steps in the probing process
    can still run out of memory in a long run started afresh. The caching allocator's
    layout differs (a fresh process fragments differently from one that has just
    freed larger trials), cuBLAS/cuDNN workspaces and autotuned kernels differ, and
    long runs see rare peaks. On H100 reference runs (torch 2.11) ResNet-50 passed 1863
    in-process and failed it fresh (1860 stable). Those variations scale with memory,
    so the margin is a share of the device's memory:

    * where the probe measured memory (``top``), the size keeps at least ``margin`` of
      the device limit unreserved at its peak. ``largest_pass`` is kept when its own peak
      already left that much; otherwise just enough samples are dropped (at least one),
      at the measured bytes per sample;
    * elsewhere, ``max(1, ⌈margin · largest_pass⌉)`` samples are dropped, the same share
      counted in samples.

    No margin is taken when every size up to ``upper`` passed: the size was not
    memory-bound.
    """
    margin = check_margin(margin)
    if not hit_limit or margin == 0.0:
        return largest_pass
    if top is not None:
        wanted = margin * top.limit - (top.limit - top.peak)
        if wanted <= 0:
            return largest_pass
        return max(lower, largest_pass - max(1, math.ceil(wanted / top.per_sample)))
    return max(lower, largest_pass - max(1, math.ceil(margin * largest_pass)))
