"""Why this plan: memory at the chosen plan, split into fixed memory, activations (the
probe's peak line) and headroom, against the limit the probe really had; and the reasons,
in words. Pure data: drawing it is :mod:`autoaccum.render`'s job."""

from __future__ import annotations

from autoaccum.formats import format_bytes
from autoaccum.memory.peaks import peak_line, peak_points
from autoaccum.plan import Plan
from autoaccum.results import MemoryBreakdown, MemoryReport, PeakLine, ProbeResult

__all__ = ["explain", "format_bytes"]


def _capacity(
    probe: ProbeResult | None, report: MemoryReport | None, on_gpu: bool, notes: list[str]
) -> tuple[int | None, str, int | None]:
    """(capacity, where it came from, bytes used outside this process's allocator)."""
    if probe is not None and probe.limit_bytes is not None:
        if report is not None and report.gpu is not None and report.gpu.total > probe.limit_bytes:
            notes.append(
                f"the device has {format_bytes(report.gpu.total)}; this process may hold "
                f"{format_bytes(probe.limit_bytes)} of it (a per-process cap, or memory other "
                "processes held when the probe ran)"
            )
        where = "the device's" if on_gpu else "the emulated device's"
        return probe.limit_bytes, f"{where} limit for this process, measured by the probe", None
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


def _reasons(probe: ProbeResult | None, plan: Plan, line: PeakLine | None) -> list[str]:
    reasons = []
    if probe is not None:
        if probe.max_micro < probe.largest_pass:
            margin = f"less a {probe.margin:.0%} margin"
        else:
            margin = "no margin taken"
        on = f" on {probe.probed_on}" if probe.probed_on else ""
        reasons.append(
            f"largest micro-batch that passed{on}: {probe.largest_pass} (limited by "
            f"{probe.limited_by}); {margin} → max_micro {probe.max_micro}"
        )
        reasons.extend(probe.notes)
        if probe.chosen is not None:
            reasons.append(f"under that ceiling, the fastest plan's micro-batch: {probe.choice}")
    else:
        reasons.append(f"max_micro {plan.max_micro} given by the user: no probe ran")
    reasons.append(
        f"{plan.describe()}: micro_batch {plan.micro_batch}, world_size {plan.world_size}"
    )
    if plan.min_micro > 1:
        reasons.append(
            f"no micro-batch below {plan.min_micro} samples: BatchNorm cannot normalise one sample"
        )
    if line is not None:
        reasons.append(
            f"peak line: peak = {format_bytes(line.fixed)} + {format_bytes(line.per_sample)}/sample"
            f" × b (r² {line.r2:.4f}, {len(line.points)} trials)"
        )
    return reasons


def explain(
    probe: ProbeResult | None,
    plan: Plan,
    footprint: dict[str, int] | None = None,
    report: MemoryReport | None = None,
) -> MemoryBreakdown:
    """The composition of device memory at ``plan.micro_batch``, and why the plan is so.

    ``fixed`` is the footprint (else the probe's ``fixed_bytes``), ``activations`` is the
    peak line's ``per_sample × plan.micro_batch``, ``other`` what the line's intercept holds
    beyond ``fixed`` (workspaces, optimizer state created during the trials),
    ``outside_torch`` what the device has in use beyond this process's allocator (CUDA
    context, other processes; only when the capacity is the whole device) and
    ``headroom`` the rest of ``capacity``. The capacity is the limit the probe measured
    (a per-process cap included), else the device's total (the host's RAM on the CPU).
    With ``probe=None`` the sizes were forced by the user's ``max_micro``; without memory
    readings activations are not measurable: both are said in ``notes``.
    """
    notes: list[str] = []
    parts = footprint if footprint is not None else (dict(probe.fixed_bytes) if probe else {})
    fixed: int | None = sum(parts.values()) if parts else None
    line = peak_line(probe.trials) if probe is not None else None
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
    elif line is not None:
        activations = max(0, round(line.per_sample * plan.micro_batch))
        if fixed is None:
            fixed = max(0, round(line.fixed))
            notes.append("fixed memory estimated from the line's intercept (no footprint given)")
        else:
            other = max(0, round(line.fixed) - fixed)
    else:
        points = peak_points(probe.trials)
        if not points:
            notes.append(
                f"activation memory was not measurable on {probe.device}: the probe recorded no "
                "peak memory (peaks are recorded on CUDA devices and emulated ones)"
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
    capacity, source, outside = _capacity(probe, report, on_gpu, notes)
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
        line=line,
        plan=plan,
        largest_pass=probe.largest_pass if probe is not None else None,
        max_micro=probe.max_micro if probe is not None else plan.max_micro,
        margin=probe.margin if probe is not None else None,
        limited_by=probe.limited_by if probe is not None else "max_micro (given by the user)",
        reasons=tuple(_reasons(probe, plan, line)),
        notes=tuple(notes),
    )
