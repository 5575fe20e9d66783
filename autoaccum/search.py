"""search_max_batch(): the largest size for which a trial runs without running out of memory."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from autoaccum.errors import ConfigError, NoBatchFitsError
from autoaccum.oom import free_memory, oom_kind
from autoaccum.plan import check_count

__all__ = ["ProbeResult", "Trial", "TrialRecord", "max_trials", "search_max_batch"]

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
            "trials": [t.to_dict() for t in self.trials],
        }


def max_trials(upper: int) -> int:
    """The most trials :func:`search_max_batch` runs, whatever ``lower``: 2⌈log2(upper)⌉ + 1."""
    return 2 * math.ceil(math.log2(upper)) + 1 if upper > 1 else 1


def _alloc_retries(device: torch.device) -> int:
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


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


def search_max_batch(
    trial: Trial,
    upper: int,
    *,
    lower: int = 1,
    device: torch.device | str | None = None,
    agree: Agree | None = None,
    cleanup: Callable[[], None] | None = None,
) -> ProbeResult:
    """The exact largest size in ``[lower, upper]`` for which ``trial(size)`` fits.

    Sizes grow exponentially from ``lower`` (``lower, 2·lower, 4·lower, …``, capped at
    ``upper``) until a trial runs out of memory, then bisect between the last size that
    passed and the first that failed: at most ``2⌈log2(upper)⌉ + 1`` trials, never one
    above ``upper``. It assumes that memory grows with size (a size above one that failed
    would fail too).

    Out-of-memory errors are recognised by :func:`autoaccum.is_oom`; any other error
    propagates. Memory is recovered (``cleanup()``, then cached blocks freed) after every
    trial, outside the ``except`` block, and no exception object is kept. On CUDA each
    trial's peak memory is recorded (the device's peak statistics are reset per trial).

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
    measure = dev.type == "cuda" and torch.cuda.is_available()
    if measure:
        free_memory(dev)
    baseline = torch.cuda.memory_allocated(dev) if measure else None
    records: list[TrialRecord] = []

    def attempt(size: int) -> bool:
        passed_before = any(r.fits for r in records)
        if measure:
            torch.cuda.reset_peak_memory_stats(dev)
            retries_before = _alloc_retries(dev)
        start = time.perf_counter()
        fits, failure = _run_trial(trial, size, dev, may_limit=passed_before)
        if measure:
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        peak_alloc = torch.cuda.max_memory_allocated(dev) if measure else None
        peak_res = torch.cuda.max_memory_reserved(dev) if measure else None
        retries = _alloc_retries(dev) - retries_before if measure else None
        if cleanup is not None:
            cleanup()
        if not fits or measure:
            free_memory(dev)
        if agree is not None:
            any_failed = agree(not fits)
            if any_failed and fits:
                fits, failure = False, "oom (another rank)"
        records.append(TrialRecord(size, fits, seconds, peak_alloc, peak_res, retries, failure))
        return fits

    size = lower
    best = 0
    first_fail: int | None = None
    while True:
        if attempt(size):
            best = size
            if size >= upper:
                break
            size = min(size * 2, upper)
        else:
            first_fail = size
            break
    if best == 0:
        raise NoBatchFitsError(_nothing_fits_message(lower, dev, records))
    if first_fail is not None:
        lo, hi = best, first_fail
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if attempt(mid):
                lo = mid
            else:
                hi = mid
        best = lo
    return ProbeResult(
        max_batch=best,
        micro_batch=best,
        trials=tuple(records),
        lower=lower,
        upper=upper,
        device=str(dev),
        baseline_allocated=baseline,
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
