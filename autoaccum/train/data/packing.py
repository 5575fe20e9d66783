"""Micro-batches under a budget of padded tokens: samples of like length share one.

A micro-batch costs its size × its longest sample in padded tokens (what the device holds and
computes), and each micro-step costs a fixed overhead besides (launches, the optimizer's
bookkeeping, a pass over the parameters). :func:`pack` takes the samples longest first and cuts
them into runs: the fewest micro-steps whose padding stays within :data:`PADDING` of the
samples' own tokens, and the least padding where no cut reaches that.
"""

from __future__ import annotations

import itertools

#: The padding a packing may add, as a share of the samples' own tokens, to save micro-steps.
PADDING = 0.05

#: The trade-offs tried, as a micro-step's cost in padded tokens over the budget: from costly
#: steps (few, padded micro-batches) to free ones (the least padding, any number of steps).
_STEP_COSTS = (*(2.0**-k for k in range(1, 13)), 0.0)


def pack(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices into ``lengths``, longest first (ties in their order), in micro-batches of at
    most ``budget`` padded tokens (a single longer sample alone): of the cuts that are optimal
    for some cost per micro-step, the one with the fewest micro-steps whose padded tokens stay
    within (1 + :data:`PADDING`) of the tokens, else the least padded one."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    size = [lengths[i] for i in order]
    allowed = (1 + PADDING) * sum(size)
    lo, hi = 0, len(_STEP_COSTS) - 1  # the padding falls as the cost per step does
    chosen = _cut(size, budget, _STEP_COSTS[hi] * budget)
    while lo < hi:  # the costliest step whose padding is allowed (a binary search)
        middle = (lo + hi) // 2
        cuts = _cut(size, budget, _STEP_COSTS[middle] * budget)
        if _padded(size, cuts) <= allowed:
            chosen, hi = cuts, middle
        else:
            lo = middle + 1
    return [order[a:b] for a, b in itertools.pairwise(chosen)]


def _cut(size: list[int], budget: int, step: float) -> list[int]:
    """The bounds (0 … n) of the runs of ``size`` (longest first) with the fewest padded tokens
    plus ``step`` per run, each run within ``budget`` or of one sample: exact, by dynamic
    programming over the prefixes."""
    n = len(size)
    best = [0.0] + [float("inf")] * n  # best[j]: the first j samples packed
    back = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):  # a run of samples i … j − 1, padded to size[i]
            if j - i > 1 and (j - i) * size[i] > budget:
                break
            cost = best[i] + (j - i) * size[i] + step
            if cost < best[j]:
                best[j], back[j] = cost, i
    bounds = [n]
    while bounds[-1]:
        bounds.append(back[bounds[-1]])
    return bounds[::-1]


def _padded(size: list[int], bounds: list[int]) -> int:
    return sum((b - a) * size[a] for a, b in itertools.pairwise(bounds))
