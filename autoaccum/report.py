"""Rendering with rich: the only module of autoaccum that imports it.

Renders a :class:`~autoaccum.memory.MemoryReport`, a :class:`~autoaccum.search.ProbeResult`
(the trial table), a :class:`~autoaccum.plan.Plan`, a
:class:`~autoaccum.memory.MemoryBreakdown` (a table and a bar of fixed / activations /
headroom) and a :class:`~autoaccum.result.FitResult`. One unit convention, labelled
on every table: GiB = 2^30 bytes (MiB = 2^20 and KiB = 2^10 for small values).
On a terminal rich colours the output; anywhere else it is plain text.
"""

from __future__ import annotations

import io

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from autoaccum.breakdown import ActivationFit, MemoryBreakdown, breakdown
from autoaccum.memory import MemoryReport
from autoaccum.plan import Plan
from autoaccum.result import FitResult
from autoaccum.search import ProbeResult

__all__ = [
    "UNITS",
    "breakdown_renderable",
    "fit_renderable",
    "format_bytes",
    "memory_bar",
    "memory_report_renderable",
    "plan_renderable",
    "print_fit_report",
    "print_report",
    "probe_renderable",
    "probe_table",
    "render_text",
    "renderable",
]

#: The unit legend printed under every table that shows bytes.
UNITS = "units: GiB = 2^30 bytes, MiB = 2^20 bytes, KiB = 2^10 bytes"

#: Bar segments: (character, style). Distinct characters keep the bar readable without colour.
_SEGMENT_LOOK = {
    "fixed": ("█", "blue"),
    "other": ("▓", "magenta"),
    "activations": ("▒", "yellow"),
    "outside torch": ("░", "red"),
    "headroom": ("·", "green"),
}


def format_bytes(n: float | None) -> str:
    """``n`` bytes in binary units, labelled: ``"1.50 GiB"``, ``"12.0 MiB"``, ``"512 B"``."""
    if n is None:
        return "—"
    size = abs(n)
    if size >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if size >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if size >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{round(n)} B"


def _percent(part: float | None, whole: float | None) -> str:
    if part is None or not whole:
        return ""
    return f"{100 * part / whole:.1f}%"


# --------------------------------------------------------------------------- memory report


def _why(reason: str | None) -> Text:
    """A reason, left-aligned in the (right-aligned) value column."""
    return Text(reason or "", justify="left", style="dim")


def memory_report_renderable(report: MemoryReport) -> RenderableType:
    """A table of the GPU, torch's allocator and the host; a reason for every missing part."""
    table = Table(
        title=f"Memory on {report.device}", box=box.SIMPLE_HEAD, show_header=True, caption=UNITS
    )
    table.add_column("part")
    table.add_column("figure")
    table.add_column("value", justify="right")
    gpu = report.gpu
    if gpu is not None:
        table.add_row("GPU", "name", gpu.name)
        table.add_row("", "total", format_bytes(gpu.total))
        table.add_row(
            "", "used (all processes)", f"{format_bytes(gpu.used)}  {_percent(gpu.used, gpu.total)}"
        )
        table.add_row("", "free", format_bytes(gpu.free))
        table.add_row("", "driver", gpu.driver_version or "unknown")
        table.add_row("", "source", gpu.source)
    else:
        table.add_row("GPU", "not available", _why(report.gpu_why))
    alloc = report.allocator
    if alloc is not None:
        table.add_row("torch allocator", "allocated", format_bytes(alloc.allocated))
        table.add_row("", "reserved", format_bytes(alloc.reserved))
        table.add_row("", "peak allocated", format_bytes(alloc.peak_allocated))
        table.add_row("", "peak reserved", format_bytes(alloc.peak_reserved))
        table.add_row(
            "", "reserved, unallocated (fragmentation)", format_bytes(alloc.fragmentation)
        )
        table.add_row("", "alloc retries", str(alloc.num_alloc_retries))
        table.add_row("", "OOMs", str(alloc.num_ooms))
    else:
        same = report.allocator_why == report.gpu_why and report.gpu is None
        why = _why("as for the GPU" if same else report.allocator_why)
        table.add_row("torch allocator", "not available", why)
    host = report.host
    if host is not None:
        table.add_row("host", "RAM total", format_bytes(host.total))
        table.add_row("", "RAM available", format_bytes(host.available))
        table.add_row("", "this process (RSS)", format_bytes(host.process_rss))
        cg = host.cgroup
        if cg is not None:
            limit = format_bytes(cg.limit) if cg.limit is not None else "no limit"
            table.add_row("", f"cgroup v{cg.version} limit", limit)
            table.add_row("", f"cgroup v{cg.version} usage", format_bytes(cg.usage))
            table.add_row("", "available to this process", format_bytes(host.effective_available))
        else:
            table.add_row("", "cgroup", _why(host.cgroup_why or "none"))
    else:
        table.add_row("host", "not available", _why(report.host_why))
    if not report.notes:
        return table
    return Group(table, *(Text(f"note: {n}", style="dim") for n in report.notes))


# --------------------------------------------------------------------------- probe and plan


def probe_table(probe: ProbeResult) -> Table:
    """The trials in the order they ran: size, fit ✓/✗, peak memory, seconds."""
    table = Table(
        title=f"Probe on {probe.device} (sizes {probe.lower}…{probe.upper})", box=box.SIMPLE_HEAD
    )
    table.add_column("#", justify="right")
    table.add_column("size", justify="right")
    table.add_column("fit")
    table.add_column("peak allocated", justify="right")
    table.add_column("peak reserved", justify="right")
    table.add_column("seconds", justify="right")
    for i, trial in enumerate(probe.trials, start=1):
        fit = (
            Text("✓", style="green")
            if trial.fits
            else Text(f"✗ {trial.failure or ''}".rstrip(), style="red")
        )
        table.add_row(
            str(i),
            str(trial.size),
            fit,
            format_bytes(trial.peak_allocated),
            format_bytes(trial.peak_reserved),
            f"{trial.seconds:.3f}",
        )
    return table


def probe_renderable(probe: ProbeResult) -> RenderableType:
    """The trial table, then what the search concluded."""
    if probe.micro_batch < probe.max_batch:
        margin = f"less a {probe.margin:.0%} margin"
    elif probe.margin and not probe.hit_limit:
        margin = "no margin: nothing ran out of memory"
    elif probe.margin:
        margin = f"no margin needed: {probe.margin:.0%} of memory already spare"
    else:
        margin = "no margin"
    summary = (
        f"largest that fit: {probe.max_batch}; micro_batch {probe.micro_batch} ({margin}); "
        f"limited by {probe.limited_by}; {len(probe.trials)} trials in {probe.seconds:.2f} s"
    )
    return Group(probe_table(probe), Text(summary), Text(UNITS, style="dim"))


def plan_renderable(plan: Plan) -> Text:
    """One line: ``Plan: target_batch 256 = 86+85+85 (accum_iter 3) × 1 rank``."""
    text = Text("Plan: ", style="bold")
    text.append(plan.describe())
    return text


# --------------------------------------------------------------------------- breakdown


def _bar_widths(values: list[int], width: int) -> list[int]:
    """Character widths proportional to ``values`` summing to ``width``; ≥ 1 for any value > 0."""
    total = sum(values)
    if total <= 0:
        return [0 for _ in values]
    exact = [v * width / total for v in values]
    widths = [int(x) for x in exact]
    by_remainder = sorted(range(len(values)), key=lambda i: exact[i] - widths[i], reverse=True)
    for i in by_remainder[: width - sum(widths)]:
        widths[i] += 1
    for i, v in enumerate(values):  # a visible sliver for every non-empty part
        if v > 0 and widths[i] == 0:
            widths[i] = 1
            widths[widths.index(max(widths))] -= 1
    return widths


def memory_bar(b: MemoryBreakdown, width: int = 60) -> Text:
    """A bar of the capacity: fixed / other / activations / outside torch / headroom."""
    segments = [(name, max(0, value)) for name, value in b.segments()]
    widths = _bar_widths([v for _, v in segments], width)
    bar = Text("[")
    for (name, _), w in zip(segments, widths, strict=True):
        char, style = _SEGMENT_LOOK[name]
        bar.append(char * w, style=style)
    bar.append("]")
    if b.capacity is not None:
        bar.append(f" {format_bytes(b.capacity)}")
    else:
        bar.append(" capacity unknown: proportions of the known parts")
    legend = Text()
    for name, value in segments:
        char, style = _SEGMENT_LOOK[name]
        if len(legend):
            legend.append("  ")
        legend.append(char, style=style)
        legend.append(f" {name} {format_bytes(value)}")
    return Text("\n").join([bar, legend])


def _why_lines(b: MemoryBreakdown) -> list[str]:
    if len(set(b.micro_sizes)) == 1:
        sizes = f"{b.micro_sizes[0]} × {b.accum_iter}"
    else:
        sizes = "+".join(str(s) for s in b.micro_sizes)
    ranks = "rank" if b.world_size == 1 else "ranks"
    lines = []
    if b.max_batch is not None:
        if b.max_micro is not None and b.max_micro < b.max_batch:
            margin = f"less a {b.margin or 0:.0%} margin"
        else:
            margin = "no margin taken"
        lines.append(
            f"largest micro-batch that fit: {b.max_batch} (limited by {b.limited_by}); "
            f"{margin} → max_micro {b.max_micro}"
        )
    else:
        lines.append("micro-batch sizes forced by the user's max_micro: no probe ran")
    lines.append(
        f"target_batch {b.target_batch} = {sizes} (accum_iter {b.accum_iter}) × {b.world_size} "
        f"{ranks}: micro_batch {b.micro_batch}, world_size {b.world_size}"
    )
    if b.fit is not None:
        lines.append(
            f"activation fit: peak = {format_bytes(b.fit.fixed)} + "
            f"{format_bytes(b.fit.per_sample)}/sample × b (r² {b.fit.r2:.4f}, "
            f"{len(b.fit.points)} trials)"
        )
    return lines


def breakdown_renderable(b: MemoryBreakdown) -> RenderableType:
    """The composition table, the bar, and the facts behind the plan."""
    table = Table(
        title=f"Memory at micro_batch {b.micro_batch}", box=box.SIMPLE_HEAD, caption=UNITS
    )
    table.add_column("part")
    table.add_column("bytes", justify="right")
    table.add_column("of capacity", justify="right")
    table.add_column("what")
    fixed_what = ", ".join(
        f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in b.fixed_parts if v
    )
    rows = [
        ("fixed", b.fixed, fixed_what or "params + grads + optimizer state"),
        ("other", b.other, "at the peak, not growing with the batch (workspaces, ...)"),
        ("activations", b.activations, f"per-sample memory × {b.micro_batch}"),
        ("outside torch", b.outside_torch, "CUDA context, other processes"),
        ("headroom", b.headroom, "left free"),
    ]
    for name, value, what in rows:
        if value is None:
            continue
        table.add_row(name, format_bytes(value), _percent(value, b.capacity), what)
    table.add_row("capacity", format_bytes(b.capacity), "", b.capacity_source)
    parts: list[RenderableType] = [table, memory_bar(b)]
    parts.append(Text("Why this plan", style="bold"))
    parts.extend(Text(f"  {line}") for line in _why_lines(b))
    parts.extend(Text(f"note: {n}", style="dim") for n in b.notes)
    return Group(*parts)


# --------------------------------------------------------------------------- fit result


def fit_renderable(result: FitResult) -> RenderableType:
    """A summary of a run: plan, probe table, losses first → last, counts, time, memory
    (the end-of-run snapshot, and the breakdown at the plan's micro_batch)."""
    parts: list[RenderableType] = [plan_renderable(result.plan)]
    if result.probe is not None:
        parts.append(probe_renderable(result.probe))
    if result.losses:
        first, last = result.losses[0], result.losses[-1]
        parts.append(Text(f"loss: {first:.4g} → {last:.4g} (first → last optimizer step)"))
    else:
        parts.append(Text("loss: no optimizer step was taken"))
    skipped = f", {result.skipped_steps} skipped (fp16 overflow)" if result.skipped_steps else ""
    rate = f", {result.samples_seen / result.seconds:.1f} samples/s" if result.seconds > 0 else ""
    parts.append(
        Text(
            f"{result.optimizer_steps} optimizer steps{skipped}, {result.samples_seen} samples, "
            f"{result.epochs} epochs, {result.seconds:.2f} s{rate}; {result.precision} on "
            f"{result.device}"
        )
    )
    if result.oom_retries:
        parts.append(
            Text(
                f"ran out of memory {result.oom_retries}× during training: those windows were "
                f"re-run smaller; the plan above is the one in force at the end"
            )
        )
    if result.memory is not None:  # the breakdown's "fixed" row lists the footprint
        parts.append(memory_report_renderable(result.memory))
        explained = breakdown(result.probe, result.plan, result.footprint or None, result.memory)
        parts.append(breakdown_renderable(explained))
    elif result.footprint:
        fp = ", ".join(
            f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in result.footprint.items() if v
        )
        parts.append(Text(f"footprint: {fp}"))
    return Group(*parts)


# --------------------------------------------------------------------------- entry points


def renderable(obj: object) -> RenderableType:
    """The rich renderable of any autoaccum result object."""
    if isinstance(obj, MemoryReport):
        return memory_report_renderable(obj)
    if isinstance(obj, MemoryBreakdown):
        return breakdown_renderable(obj)
    if isinstance(obj, ProbeResult):
        return probe_renderable(obj)
    if isinstance(obj, Plan):
        return plan_renderable(obj)
    if isinstance(obj, FitResult):
        return fit_renderable(obj)
    if isinstance(obj, ActivationFit):
        return Text(
            f"peak = {format_bytes(obj.fixed)} + {format_bytes(obj.per_sample)}/sample × b "
            f"(r² {obj.r2:.4f})"
        )
    raise TypeError(f"autoaccum.report cannot render a {type(obj).__name__}")


def print_report(obj: object, console: Console | None = None) -> None:
    """Print any autoaccum result object (see :func:`renderable`)."""
    (console or Console()).print(renderable(obj))


def print_fit_report(result: FitResult, console: Console | None = None) -> None:
    """Print the summary of a :func:`autoaccum.fit` run."""
    (console or Console()).print(fit_renderable(result))


def render_text(obj: object, width: int = 100) -> str:
    """``obj`` rendered as plain text (no colour, no terminal), ``width`` columns wide."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None)
    console.print(obj if isinstance(obj, (str, Text)) else renderable(obj))
    return buffer.getvalue()
