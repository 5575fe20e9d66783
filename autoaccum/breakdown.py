"""Why this plan: device memory at the chosen plan split into fixed memory, activations
(a least-squares line through the probe's peaks) and headroom."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from autoaccum.memory import MemoryReport
from autoaccum.plan import Plan
from autoaccum.search import ProbeResult

__all__ = ["ActivationFit", "MemoryBreakdown", "breakdown", "fit_activation"]


@dataclass(frozen=True)
class ActivationFit:
    """A least-squares line through the probe's peaks: ``peak(b) = fixed + per_sample · b``."""

    fixed: float  #: bytes at b = 0: everything that does not grow with the batch
    per_sample: float  #: bytes each sample adds (activations)
    r2: float  #: coefficient of determination (1.0 for a perfect line)
    max_residual: float  #: largest |measured − fitted| over the points, bytes
    points: tuple[tuple[int, int], ...]  #: (size, peak_allocated bytes) of the passing trials

    def predict(self, size: int) -> float:
        """The fitted peak at micro-batch ``size``, bytes."""
        return self.fixed + self.per_sample * size

    def to_dict(self) -> dict[str, object]:
        return {
            "fixed": self.fixed,
            "per_sample": self.per_sample,
            "r2": self.r2,
            "max_residual": self.max_residual,
            "points": [list(p) for p in self.points],
        }


def _peak_points(probe: ProbeResult) -> list[tuple[int, int]]:
    return [
        (t.size, t.peak_allocated) for t in probe.trials if t.fits and t.peak_allocated is not None
    ]


def fit_activation(probe: ProbeResult) -> ActivationFit | None:
    """The line ``peak_allocated(b) = fixed + per_sample · b`` over the probe's passing trials.

    None when fewer than two distinct sizes passed with a peak measured (the CPU records
    no peaks). Computed in exact rational arithmetic, so peaks that lie on a line give
    that line exactly.
    """
    points = _peak_points(probe)
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
    return ActivationFit(
        fixed=float(intercept),
        per_sample=float(slope),
        r2=r2,
        max_residual=float(max(abs(r) for r in residuals)),
        points=tuple(points),
    )


# --------------------------------------------------------------------------- the breakdown


@dataclass(frozen=True)
class MemoryBreakdown:
    """What device memory holds at the chosen plan, and why the plan is what it is.

    The segments ``fixed``, ``other``, ``activations``, ``outside_torch`` and ``headroom``
    add up to ``capacity`` whenever capacity is known (an unknown segment counts as 0).
    """

    capacity: int | None  #: device total (or the cgroup limit / host RAM on the CPU)
    capacity_source: str
    fixed: int | None  #: params + buffers + grads + optimizer state
    fixed_parts: tuple[tuple[str, int], ...]  #: the footprint, key by key
    other: int | None  #: batch-independent memory at the peak beyond ``fixed`` (fit intercept)
    activations: int | None  #: per_sample × micro_batch
    outside_torch: int | None  #: used on the device outside this process's allocator
    headroom: int | None  #: capacity − all of the above
    fit: ActivationFit | None
    # why this plan
    target_batch: int
    world_size: int
    micro_batch: int  #: the largest micro-batch of the plan
    accum_iter: int
    micro_sizes: tuple[int, ...]
    max_batch: int | None  #: the largest size that fitted (None: no probe ran)
    max_micro: int | None  #: max_batch less the margin: the plan's ceiling
    margin: float | None
    limited_by: str  #: "memory", "upper=N" or "max_micro (given by the user)"
    notes: tuple[str, ...] = field(default=())

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
        return {
            "capacity": self.capacity,
            "capacity_source": self.capacity_source,
            "fixed": self.fixed,
            "fixed_parts": dict(self.fixed_parts),
            "other": self.other,
            "activations": self.activations,
            "outside_torch": self.outside_torch,
            "headroom": self.headroom,
            "fit": self.fit.to_dict() if self.fit is not None else None,
            "target_batch": self.target_batch,
            "world_size": self.world_size,
            "micro_batch": self.micro_batch,
            "accum_iter": self.accum_iter,
            "micro_sizes": list(self.micro_sizes),
            "max_batch": self.max_batch,
            "max_micro": self.max_micro,
            "margin": self.margin,
            "limited_by": self.limited_by,
            "notes": list(self.notes),
        }

    def __rich__(self) -> object:
        from autoaccum.report import renderable

        return renderable(self)


def _capacity(
    report: MemoryReport | None, on_gpu: bool, notes: list[str]
) -> tuple[int | None, str, int | None]:
    """(capacity, where it came from, bytes used outside this process's allocator)."""
    if report is None:
        return None, "unknown (no memory report)", None
    if on_gpu and report.gpu is not None:
        outside = None
        if report.allocator is not None:
            outside = max(0, report.gpu.used - report.allocator.reserved)
        return report.gpu.total, f"{report.gpu.name} total ({report.gpu.source})", outside
    if on_gpu:
        notes.append(f"device capacity unknown: {report.gpu_why}")
        return None, "unknown", None
    host = report.host
    if host is None:
        return None, "unknown", None
    if host.cgroup is not None and host.cgroup.limit is not None and host.cgroup.limit < host.total:
        return host.cgroup.limit, "cgroup memory limit", None
    return host.total, "host RAM", None


def breakdown(
    probe: ProbeResult | None,
    plan: Plan,
    footprint: dict[str, int] | None = None,
    report: MemoryReport | None = None,
) -> MemoryBreakdown:
    """The composition of device memory at ``plan.micro_batch``, and why the plan is so.

    ``fixed`` is the footprint (else the probe's ``fixed_bytes``), ``activations`` is
    :func:`fit_activation`'s ``per_sample × plan.micro_batch``, ``other`` what the fit's
    intercept holds beyond ``fixed`` (workspaces, optimizer state created during the
    trials), ``outside_torch`` what the device has in use beyond this process's
    allocator (CUDA context, other processes) and ``headroom`` the rest of ``capacity``.
    With ``probe=None`` the sizes were forced by the user's ``max_micro``; on the CPU no
    peaks are recorded and activations are not measurable: both are said in ``notes``.
    """
    notes: list[str] = []
    parts = footprint if footprint is not None else (dict(probe.fixed_bytes) if probe else {})
    fixed: int | None = sum(parts.values()) if parts else None
    fit = fit_activation(probe) if probe is not None else None
    on_gpu = (
        probe.device.startswith("cuda")
        if probe is not None
        else (report is not None and report.device.startswith("cuda"))
    )
    activations: int | None = None
    other: int | None = None
    if probe is None:
        notes.append(
            f"no probe ran: the micro-batch sizes were forced by the user's max_micro, "
            f"so activation memory at micro_batch {plan.micro_batch} was not measured"
        )
    elif fit is not None:
        activations = max(0, round(fit.per_sample * plan.micro_batch))
        if fixed is None:
            fixed = max(0, round(fit.fixed))
            notes.append("fixed memory estimated from the fit's intercept (no footprint given)")
        else:
            other = max(0, round(fit.fixed) - fixed)
    else:
        points = _peak_points(probe)
        if not points:
            where = "on CPU" if not on_gpu else f"on {probe.device}"
            notes.append(
                f"activation memory was not measurable {where}: the probe recorded no peak "
                "memory (peaks are recorded on CUDA devices only)"
            )
        elif fixed is not None:
            size, peak = max(points)
            activations = max(0, round((peak - fixed) * plan.micro_batch / size))
            notes.append(
                f"activations estimated from one trial (size {size}): a line needs passing "
                "trials at two or more sizes"
            )
        else:
            notes.append("activation memory not estimated: one trial size only and no footprint")
    if "gradients_expected" in parts:
        notes.append("gradients not allocated yet: counted as the trainable parameters' bytes")
    capacity, source, outside = _capacity(report, on_gpu, notes)
    headroom = None
    if capacity is not None:
        used = sum(v or 0 for v in (fixed, other, activations, outside))
        headroom = capacity - used
        if headroom < 0:
            notes.append("the parts exceed the capacity: the snapshot and the probe disagree")
    return MemoryBreakdown(
        capacity=capacity,
        capacity_source=source,
        fixed=fixed,
        fixed_parts=tuple(parts.items()),
        other=other,
        activations=activations,
        outside_torch=outside,
        headroom=headroom,
        fit=fit,
        target_batch=plan.target_batch,
        world_size=plan.world_size,
        micro_batch=plan.micro_batch,
        accum_iter=plan.accum_iter,
        micro_sizes=plan.micro_sizes,
        max_batch=probe.max_batch if probe is not None else None,
        max_micro=probe.micro_batch if probe is not None else None,
        margin=probe.margin if probe is not None else None,
        limited_by=probe.limited_by if probe is not None else "max_micro (given by the user)",
        notes=tuple(notes),
    )
