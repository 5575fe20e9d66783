"""search_max_batch(): the largest size for which a trial runs without running out of memory."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from autoaccum.errors import ConfigError, NoBatchFitsError
from autoaccum.meter import Meter, meter_for
from autoaccum.oom import free_memory, oom_kind
from autoaccum.plan import check_count

__all__ = [
    "ProbeResult",
    "Trial",
    "TrialRecord",
    "max_trials",
    "predict_fit",
    "search_max_batch",
]

#: ``trial(size)`` runs one real training trial at micro-batch ``size``; it raises on OOM.
Trial = Callable[[int], object]
#: ``agree(failed)`` returns whether *any* rank failed (an all-reduce MAX); identity alone.
Agree = Callable[[bool], bool]


@dataclass(frozen=True)
class TrialRecord:
    """One trial of the search."""

    size: int
    fits: bool
    seconds: float
    peak_allocated: int | None = None  #: bytes, torch's allocator peak during the trial (CUDA)
    peak_reserved: int | None = None  #: bytes reserved by the caching allocator at the peak
    alloc_retries: int | None = None  #: cudaMalloc retries during the trial (memory pressure)
    failure: str | None = None  #: "oom" or "size_limit" when the trial did not fit

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class ProbeResult:
    """What a search found.

    ``max_batch`` is the largest size that passed; ``micro_batch`` the size to train
    with (``max_batch`` less the safety margin of :func:`autoaccum.probe`; equal to
    ``max_batch`` for a bare :func:`search_max_batch`).
    """

    max_batch: int
    micro_batch: int
    trials: tuple[TrialRecord, ...]
    lower: int
    upper: int
    margin: float = 0.0
    device: str = "cpu"
    baseline_allocated: int | None = None  #: bytes allocated before the first trial (CUDA)
    fixed_bytes: dict[str, int] = field(default_factory=dict)  #: params/grads/optimizer state
    limit_bytes: int | None = None  #: bytes this process may hold on the device (measured)

    @property
    def hit_limit(self) -> bool:
        """True when some trial ran out of memory (the size is memory-bound, not capped)."""
        return any(not t.fits for t in self.trials)

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.trials)

    @property
    def limited_by(self) -> str:
        return "memory" if self.hit_limit else f"upper={self.upper}"

    def to_dict(self) -> dict[str, object]:
        return {
            "max_batch": self.max_batch,
            "micro_batch": self.micro_batch,
            "lower": self.lower,
            "upper": self.upper,
            "margin": self.margin,
            "device": self.device,
            "limited_by": self.limited_by,
            "seconds": self.seconds,
            "baseline_allocated": self.baseline_allocated,
            "fixed_bytes": dict(self.fixed_bytes),
            "limit_bytes": self.limit_bytes,
            "trials": [t.to_dict() for t in self.trials],
        }


#: Memory-guided jumps aim at this share of the device limit, a little under it, and the
#: search then climbs the last steps: a jump that lands just below the limit costs one
#: trial, one that overshoots costs a bisection.
AIM = 0.96
#: At most this many memory-guided jumps per search; the rest is galloping and bisection.
MAX_JUMPS = 3


def max_trials(upper: int, *, guided: bool = False) -> int:
    """The most trials :func:`search_max_batch` runs, whatever ``lower``: 2⌈log2(upper)⌉ + 1,
    and ``MAX_JUMPS + 2`` more when memory readings guide it."""
    base = 2 * math.ceil(math.log2(upper)) + 1 if upper > 1 else 1
    return base + MAX_JUMPS + 2 if guided else base


def _run_trial(
    trial: Trial, size: int, device: torch.device, may_limit: bool
) -> tuple[bool, str | None]:
    """Run one trial; ``(fits, failure kind)``. Non-OOM errors propagate unchanged."""
    try:
        trial(size)
    except Exception as exc:
        kind = oom_kind(exc)
        if kind is None or (kind == "size_limit" and not may_limit):
            raise
        return False, kind
    return True, None


def predict_fit(records: list[TrialRecord], budget: float) -> int | None:
    """The largest size whose peak of live tensors stays within ``budget`` bytes,
    extrapolated along the line through the two largest trials that fitted; ``None``
    without two readings.

    Live (allocated) bytes, not reserved ones: they grow in proportion to the batch,
    while the allocator's reserve saturates near the limit as it recycles its cache.
    """
    peaks = {r.size: r.peak_allocated for r in records if r.fits and r.peak_allocated is not None}
    if len(peaks) < 2:
        return None
    (s1, m1), (s2, m2) = sorted(peaks.items())[-2:]
    slope = (m2 - m1) / (s2 - s1)
    if slope <= 0:
        return None
    return s2 + math.floor((budget - m2) / slope)


class _Steps:
    """Chooses the next size: exponential growth (memory-guided where readings allow),
    then bisection between the largest size that fitted and the smallest that did not."""

    def __init__(self, lower: int, upper: int, limit: float | None) -> None:
        self.upper = upper
        #: a jump aims first a little under the limit, then (from there) at the limit
        self.budgets = (AIM * limit, limit) if limit is not None else ()
        self.lo = 0  #: the largest size that fitted so far
        self.hi: int | None = None  #: the smallest size that did not
        self.jumps = 0
        self.stride = 1  #: the gallop's next stride once no jump is left to make
        self.next = lower

    def done(self) -> bool:
        return self.lo >= self.upper or (self.hi is not None and self.hi - self.lo <= 1)

    def advance(self, size: int, fits: bool, records: list[TrialRecord]) -> None:
        if fits:
            self.lo = size
        else:
            self.hi = size
        if self.done():
            return
        if self.hi is not None:
            self.next = (self.lo + self.hi) // 2
            return
        guesses = [predict_fit(records, budget) for budget in self.budgets]
        if not guesses or guesses[0] is None:  # nothing measured yet: double
            self.next = min(2 * self.lo, self.upper)
            return
        ahead = [g for g in guesses if g is not None and g > self.lo]
        if ahead and self.jumps < MAX_JUMPS:
            self.jumps += 1
            self.next = min(ahead[0], self.upper)
        else:  # at the predicted limit already: gallop up by 1, 2, 4, … samples
            self.next = min(self.lo + self.stride, self.upper)
            self.stride *= 2


def search_max_batch(
    trial: Trial,
    upper: int,
    *,
    lower: int = 1,
    device: torch.device | str | None = None,
    agree: Agree | None = None,
    cleanup: Callable[[], None] | None = None,
    meter: Meter | None = None,
) -> ProbeResult:
    """The exact largest size in ``[lower, upper]`` for which ``trial(size)`` fits.

    Sizes grow exponentially from ``lower`` (``lower, 2·lower, 4·lower, …``, capped at
    ``upper``) until a trial runs out of memory, then bisect between the last size that
    passed and the first that failed. It assumes that memory grows with size (a size
    above one that failed would fail too).

    Where the device reports memory (a :class:`~autoaccum.meter.Meter`; on CUDA one is
    made for ``device``), each trial's peaks are recorded and the growth is *guided*:
    once two sizes have fitted, the line through their peaks (:func:`predict_fit`) predicts the size
    that fills :data:`AIM` of the device's limit and the search jumps there; from a size
    already past that aim, it jumps to the size predicted to fill the limit itself (at
    most :data:`MAX_JUMPS` jumps in all), then gallops up 1, 2, 4, … samples to the first
    failure and bisects. The result is the same exact maximum in fewer trials, most of
    them cheap. H100 readings under a 24 GiB cap, replayed in the tests: GPT-2 small
    1, 2, 16, 26, 21, 23, 22 instead of 1, 2, 4, 8, 16, 32, 24, 20, 22, 23; ResNet-50
    10 trials instead of 19.
    Guidance is off in a distributed search (``agree`` given): ranks' readings differ,
    and every rank must try the same sizes. At most :func:`max_trials` trials.

    Out-of-memory errors are recognised by :func:`autoaccum.is_oom`; any other error
    propagates. Memory is recovered after every trial (``cleanup()``, then cached blocks
    freed), outside the ``except`` block, and no exception object is kept; a garbage
    collection runs only when a failed trial left more allocated than before it.

    ``agree`` makes all ranks of a distributed job take the same branch: it receives this
    rank's "ran out of memory" flag and returns whether any rank did.
    """
    check_count("lower", lower)
    check_count("upper", upper)
    if upper < lower:
        raise ConfigError(
            f"upper ({upper}) is smaller than lower ({lower}); the search needs lower ≤ upper"
        )
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cpu":
        free_memory(dev)  # the limit and the baseline are read with the cache emptied
    if meter is None:
        meter = meter_for(dev)
    baseline = meter.allocated() if meter is not None else None
    settled = baseline  # live bytes after the last trial that fitted
    records: list[TrialRecord] = []
    guided = meter is not None and agree is None
    steps = _Steps(lower, upper, meter.limit if guided and meter is not None else None)

    def attempt(size: int) -> bool:
        nonlocal settled
        passed_before = any(r.fits for r in records)
        if meter is not None:
            meter.start()
        start = time.perf_counter()
        fits, failure = _run_trial(trial, size, dev, may_limit=passed_before)
        reading = meter.stop() if meter is not None else None
        seconds = time.perf_counter() - start
        if cleanup is not None:
            cleanup()
        if meter is None:
            if not fits:
                free_memory(dev)
        else:
            # A failed trial's frames are gone by reference counting unless a cycle holds
            # them: pay for a full collection only when memory says something is held.
            leaked = not fits and settled is not None and meter.allocated() > settled
            free_memory(dev, collect=leaked)
            if fits:
                settled = meter.allocated()
        if agree is not None:
            any_failed = agree(not fits)
            if any_failed and fits:
                fits, failure = False, "oom (another rank)"
        records.append(
            TrialRecord(
                size,
                fits,
                seconds,
                reading.peak_allocated if reading else None,
                reading.peak_reserved if reading else None,
                reading.alloc_retries if reading else None,
                failure,
            )
        )
        return fits

    while True:
        size = steps.next
        fits = attempt(size)
        if not fits and steps.lo == 0:
            raise NoBatchFitsError(_nothing_fits_message(lower, dev, records))
        steps.advance(size, fits, records)
        if steps.done():
            break
    return ProbeResult(
        max_batch=steps.lo,
        micro_batch=steps.lo,
        trials=tuple(records),
        lower=lower,
        upper=upper,
        device=str(dev),
        baseline_allocated=baseline,
        limit_bytes=meter.limit if meter is not None else None,
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _nothing_fits_message(lower: int, dev: torch.device, records: list[TrialRecord]) -> str:
    tried = ", ".join(f"{r.size} ({r.failure})" for r in records)
    where = str(dev)
    if dev.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(dev)
        where = (
            f"{torch.cuda.get_device_name(dev)} ({dev}): {_gib(total)} total, {_gib(free)} free "
            f"now, {_gib(torch.cuda.memory_allocated(dev))} held by this process's tensors"
        )
    return (
        f"even the smallest micro-batch ({lower}) ran out of memory on {where}; tried: {tried}. "
        "To fit: free memory held by other tensors or processes, use precision='bf16' "
        "(or 'fp16'), activation checkpointing, a smaller model or sequence length, or an "
        "optimizer with less state (e.g. SGD, 8-bit Adam)."
    )
