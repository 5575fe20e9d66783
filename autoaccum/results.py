"""The frozen result types: what a trial, a probe, a memory snapshot, a memory explanation
and a training run found. Data only: no device is touched here and nothing is drawn.

Every result turns into plain JSON-ready data with ``to_dict()`` (:func:`plain`): tuples
become lists, nested dataclasses dicts, derived properties are added where a reader of
the JSON needs them.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from autoaccum.plan import Plan

__all__ = [
    "AllocatorMemory",
    "CgroupMemory",
    "FitResult",
    "GpuMemory",
    "HostMemory",
    "MemoryBreakdown",
    "MemoryReport",
    "PeakLine",
    "ProbeResult",
    "Resize",
    "TrialRecord",
    "field_dict",
    "plain",
]


def plain(obj: Any) -> Any:
    """``obj`` as JSON-ready data: dataclasses and mappings as dicts, sequences as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        to_dict = getattr(obj, "to_dict", None)
        if callable(to_dict):
            return to_dict()
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def field_dict(obj: Any) -> dict[str, Any]:
    """A dataclass's own fields as plain data (what ``to_dict`` builds on)."""
    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


# --------------------------------------------------------------------------- probing


@dataclass(frozen=True)
class TrialRecord:
    """One trial of the search: a size, and whether it passed (trained without running out
    of memory)."""

    size: int
    passed: bool
    seconds: float
    peak_allocated: int | None = None  #: bytes, torch's allocator peak during the trial
    peak_reserved: int | None = None  #: bytes reserved by the caching allocator at the peak
    alloc_retries: int | None = None  #: cudaMalloc retries during the trial (memory pressure)
    failure: str | None = None  #: "oom", "size_limit" or "oom (another rank)" when it failed

    def to_dict(self) -> dict[str, object]:
        return field_dict(self)


@dataclass(frozen=True)
class ProbeResult:
    """What a probe (or a bare search) found.

    ``largest_pass`` is the largest size whose trial passed; ``max_micro`` the ceiling
    the plan may use: ``largest_pass`` less the safety margin of :func:`autoaccum.probe`
    (equal to it for a bare :func:`autoaccum.search_max_batch`).
    """

    largest_pass: int
    max_micro: int
    trials: tuple[TrialRecord, ...]
    lower: int
    upper: int
    margin: float = 0.0
    device: str = "cpu"
    baseline_allocated: int | None = None  #: bytes allocated before the first trial
    fixed_bytes: dict[str, int] = field(default_factory=dict)  #: params/grads/optimizer state
    limit_bytes: int | None = None  #: bytes this process may hold on the device (measured)
    probed_on: str = ""  #: what the trials ran on, e.g. "the 8 heaviest of 120 samples"
    notes: tuple[str, ...] = ()  #: how the ceiling was reached, when not by a plain search
    #: the micro-batch ``choose="fastest"`` picked under the ceiling ``max_micro`` (None: the
    #: ceiling itself, the largest)
    chosen: int | None = None
    choice: str = ""  #: why the fastest plan's micro-batch was chosen under the ceiling

    @property
    def hit_limit(self) -> bool:
        """True when some trial ran out of memory (the size is memory-bound, not capped)."""
        return any(not t.passed for t in self.trials)

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.trials)

    @property
    def limited_by(self) -> str:
        return "memory" if self.hit_limit else f"upper={self.upper}"

    def to_dict(self) -> dict[str, object]:
        return {**field_dict(self), "limited_by": self.limited_by, "seconds": self.seconds}


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class PeakLine:
    """A least-squares line through the passing trials' peaks:
    ``peak(b) = fixed + per_sample · b``."""

    fixed: float  #: bytes at b = 0: everything that does not grow with the batch
    per_sample: float  #: bytes each sample adds (activations)
    r2: float  #: coefficient of determination (1.0 for a perfect line)
    max_residual: float  #: largest |measured − fitted| over the points, bytes
    points: tuple[tuple[int, int], ...]  #: (size, peak_allocated bytes) of the passing trials

    def predict(self, size: int) -> float:
        """The line's peak at micro-batch ``size``, bytes."""
        return self.fixed + self.per_sample * size

    def to_dict(self) -> dict[str, object]:
        return field_dict(self)


@dataclass(frozen=True)
class CgroupMemory:
    """The memory cgroup that binds this process (a container's limit), in bytes."""

    version: int  #: 1 or 2
    path: str  #: the cgroup directory read
    limit: int | None  #: None: no limit ("max" in v2, a huge number in v1)
    usage: int | None  #: memory.current (v2) or memory.usage_in_bytes (v1)

    @property
    def remaining(self) -> int | None:
        """Bytes left under the limit; None without a limit."""
        if self.limit is None:
            return None
        return max(0, self.limit - (self.usage or 0))

    def to_dict(self) -> dict[str, object]:
        return {**field_dict(self), "remaining": self.remaining}


@dataclass(frozen=True)
class GpuMemory:
    """The whole GPU as the driver sees it (all processes), in bytes."""

    name: str
    index: int  #: the torch device index (after CUDA_VISIBLE_DEVICES)
    uuid: str | None
    total: int
    free: int
    used: int
    driver_version: str | None
    source: str  #: "nvml" or "torch.cuda.mem_get_info"

    def to_dict(self) -> dict[str, object]:
        return field_dict(self)


@dataclass(frozen=True)
class AllocatorMemory:
    """torch's CUDA caching allocator in this process, in bytes (``torch.cuda.memory_stats``)."""

    allocated: int  #: held by live tensors
    reserved: int  #: obtained from the driver (allocated + cached)
    peak_allocated: int
    peak_reserved: int
    num_alloc_retries: int  #: cudaMalloc failures retried after freeing the cache (pressure)
    num_ooms: int  #: out-of-memory errors raised

    @property
    def fragmentation(self) -> int:
        """Reserved but not allocated: cached blocks no tensor uses right now."""
        return max(0, self.reserved - self.allocated)

    def to_dict(self) -> dict[str, object]:
        return {**field_dict(self), "fragmentation": self.fragmentation}


@dataclass(frozen=True)
class HostMemory:
    """Host RAM (psutil) and the cgroup limit that applies to this process, in bytes.

    Inside a container ``total`` and ``available`` describe the whole machine; the
    cgroup limit is what really bounds this process (see :attr:`effective_available`).
    """

    total: int
    available: int
    process_rss: int  #: resident memory of this process
    cgroup: CgroupMemory | None
    cgroup_why: str | None = None  #: why ``cgroup`` is None

    @property
    def effective_available(self) -> int:
        """RAM this process can still get: the smaller of ``available`` and the cgroup's room."""
        room = self.cgroup.remaining if self.cgroup is not None else None
        return self.available if room is None else min(self.available, room)

    def to_dict(self) -> dict[str, object]:
        return {**field_dict(self), "effective_available": self.effective_available}


@dataclass(frozen=True)
class MemoryReport:
    """A snapshot of device and host memory. Missing parts are None, with the reason beside."""

    device: str  #: the torch device described, e.g. "cuda:0" or "cpu"
    gpu: GpuMemory | None
    gpu_why: str | None
    allocator: AllocatorMemory | None
    allocator_why: str | None
    host: HostMemory | None
    host_why: str | None
    notes: tuple[str, ...] = ()  #: caveats, e.g. the NVML fallback that was used

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-able data (``json.dumps`` works on it)."""
        return field_dict(self)


@dataclass(frozen=True)
class MemoryBreakdown:
    """What device memory holds at the chosen plan, and why the plan is what it is.

    The segments ``fixed``, ``other``, ``activations``, ``outside_torch`` and ``headroom``
    add up to ``capacity`` whenever capacity is known (an unknown segment counts as 0).
    """

    capacity: int | None  #: what this process may hold: the probe's limit, else the device
    capacity_source: str
    fixed: int | None  #: params + buffers + grads + optimizer state
    fixed_parts: tuple[tuple[str, int], ...]  #: the footprint, key by key
    other: int | None  #: batch-independent memory at the peak beyond ``fixed`` (the line's)
    activations: int | None  #: per_sample × micro_batch
    outside_torch: int | None  #: used on the device outside this process's allocator
    headroom: int | None  #: capacity − all of the above
    line: PeakLine | None  #: the peak line through the probe's passing trials
    plan: Plan
    largest_pass: int | None  #: the largest size whose trial passed (None: no probe ran)
    max_micro: int | None  #: the ceiling the plan was made under
    margin: float | None
    limited_by: str  #: "memory", "upper=N" or "max_micro (given by the user)"
    reasons: tuple[str, ...]  #: why the plan is what it is, in words
    notes: tuple[str, ...] = ()  #: caveats of the figures

    def segments(self) -> tuple[tuple[str, int], ...]:
        """(name, bytes) of each known non-empty part, headroom last: the bar's pieces."""
        named = (
            ("fixed", self.fixed),
            ("other", self.other),
            ("activations", self.activations),
            ("outside torch", self.outside_torch),
            ("headroom", self.headroom),
        )
        return tuple((name, value) for name, value in named if value)

    def to_dict(self) -> dict[str, object]:
        return {**field_dict(self), "fixed_parts": dict(self.fixed_parts)}


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Resize:
    """A change of the micro-batch during training, and the window where it happened."""

    step: int  #: the optimizer step (1-based) whose window was re-run or grown
    epoch: int
    window: int  #: the window's index within its epoch
    old: int  #: the micro-batch before
    new: int  #: the micro-batch after
    reason: str  #: "oom" (shrunk after running out of memory) or "grow" (after clean windows)

    def to_dict(self) -> dict[str, object]:
        return field_dict(self)


@dataclass(frozen=True)
class FitResult:
    """The outcome of :func:`autoaccum.fit`.

    ``losses`` holds the true window loss of every optimizer step: the item-weighted
    mean over all samples (or tokens) of the window, across all ranks.
    """

    plan: Plan  #: the plan in force at the end (see ``resizes`` for changes during training)
    probe: ProbeResult | None
    optimizer_steps: int
    samples_seen: int  #: samples trained on, across all ranks
    losses: tuple[float, ...]
    epochs: int  #: epochs started
    seconds: float
    precision: str  #: the resolved precision: "bf16", "fp16" or "fp32"
    device: str
    skipped_steps: int = 0  #: fp16 steps skipped by the GradScaler (inf/NaN gradients)
    oom_retries: int = 0  #: windows re-run with a smaller micro-batch after running out of memory
    resizes: tuple[Resize, ...] = ()  #: every change of the micro-batch during training
    samples_dropped: int = 0  #: samples left untrained, with a warning (see the README)
    items_seen: float = 0.0  #: items (count_fn: samples, or tokens) trained on, all ranks
    stopped_early: bool = False  #: a callback asked the run to stop
    evaluations: tuple[dict[str, Any], ...] = ()  #: what Evaluate measured, step by step
    memory: MemoryReport | None = None  #: memory snapshot at the end of training
    footprint: dict[str, int] = field(default_factory=dict)  #: bytes of params/grads/optimizer
    breakdown: MemoryBreakdown | None = None  #: memory at the plan, and why this plan

    @property
    def tokens_seen(self) -> float:
        """Deprecated name of :attr:`items_seen` (removed in the next release)."""
        warnings.warn("FitResult.tokens_seen is now items_seen", DeprecationWarning, stacklevel=2)
        return self.items_seen

    def to_dict(self) -> dict[str, object]:
        return field_dict(self)
