"""The frozen result types: what a trial, a probe, a memory snapshot, a memory explanation
and a training run found. Data only: no device is touched here and nothing is drawn.

Every result turns into plain JSON-ready data with ``to_dict()`` (:func:`plain`): tuples
become lists, nested dataclasses dicts, derived properties are added where a reader of
the JSON needs them. The probe, memory and run results also say what they hold in one line
(``describe()``), which is what their ``repr`` shows; tables are :mod:`autoaccum.render`'s.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from autoaccum.formats import counted, field_dict, format_bytes, plain
from autoaccum.plan import Plan
from autoaccum.snapshot import AllocatorMemory, CgroupMemory, GpuMemory, HostMemory, MemoryReport

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

    def __repr__(self) -> str:
        passed = "✓" if self.passed else f"✗ {self.failure or 'failed'}"
        peak = f", peak {format_bytes(self.peak_allocated)}" if self.peak_allocated else ""
        return f"TrialRecord({self.size} {passed}{peak}, {self.seconds:.3f} s)"

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

    def describe(self) -> str:
        """One line: the ceiling, why, and the trials in the order they ran."""
        if self.max_micro < self.largest_pass:
            how = f"{self.largest_pass} passed, less a {self.margin:.0%} margin"
        else:
            how = "the largest that passed"
        limit = (
            f" ({format_bytes(self.limit_bytes)})" if self.limit_bytes and self.hit_limit else ""
        )
        chosen = f"; the fastest plan's micro-batch: {self.chosen}" if self.chosen else ""
        trials = ", ".join(f"{t.size} {'✓' if t.passed else '✗'}" for t in self.trials)
        return (
            f"max_micro {self.max_micro}: {how}, limited by {self.limited_by}{limit}{chosen}; "
            f"{counted(len(self.trials), 'trial')} on {self.device} in {self.seconds:.2f} s: "
            f"{trials}"
        )

    def __repr__(self) -> str:
        return f"ProbeResult({self.describe()})"

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
    """A change of the micro-batch during training, and the window where it happened (with
    ``target_tokens``: of the budget of padded tokens; ``old`` and ``new`` are budgets)."""

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

    def describe(self) -> str:
        """One line: what the run did, with which plan, and anything that went differently."""
        losses = self.losses
        loss = f"loss {losses[0]:.4g} → {losses[-1]:.4g}" if losses else "no optimizer step"
        parts = [
            f"{counted(self.optimizer_steps, 'optimizer step')}, "
            f"{counted(self.samples_seen, 'sample')}, {counted(self.epochs, 'epoch')} in "
            f"{self.seconds:.1f} s, {loss}",
            f"{self.plan.describe()}, {self.precision} on {self.device}",
        ]
        if self.oom_retries:
            parts.append(
                f"{counted(self.oom_retries, 'window')} re-run after running out of memory"
            )
        if self.resizes:
            parts.append(f"{counted(len(self.resizes), 'micro-batch change')}")
        if self.skipped_steps:
            parts.append(f"{counted(self.skipped_steps, 'step')} skipped (fp16 overflow)")
        if self.samples_dropped:
            parts.append(f"{counted(self.samples_dropped, 'sample')} not trained")
        if self.stopped_early:
            parts.append("stopped early by a callback")
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"FitResult({self.describe()})"

    def to_dict(self) -> dict[str, object]:
        return field_dict(self)
