"""Tables and bars with rich: everything autoaccum draws but the progress bar.

Draws a :class:`~autoaccum.memory.collect.MemoryReport`, a
:class:`~autoaccum.results.ProbeResult` (the trial table), a :class:`~autoaccum.plan.Plan`,
a :class:`~autoaccum.memory.explain.MemoryBreakdown` (a table and a bar of fixed /
activations / headroom, and the reasons for the plan) and a
:class:`~autoaccum.results.FitResult`. It only draws: every figure and every reason comes
computed in the data. One unit convention, labelled on every table: GiB = 2^30 bytes
(MiB = 2^20 and KiB = 2^10 for small values). On a terminal rich colours the output;
anywhere else it is plain text.
"""

from __future__ import annotations

import io

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from autoaccum.formats import format_bytes
from autoaccum.plan import Plan
from autoaccum.render.text import (
    SEGMENT_LOOK,
    UNITS,
    bar_widths,
    fit_lines,
    memory_measured,
    percent,
    plan_line,
)
from autoaccum.results import FitResult, MemoryBreakdown, MemoryReport, PeakLine, ProbeResult

__all__ = [
    "breakdown_renderable",
    "fit_renderable",
    "memory_bar",
    "memory_glance",
    "memory_report_renderable",
    "plan_renderable",
    "print_fit_report",
    "print_plan",
    "print_report",
    "probe_renderable",
    "probe_table",
    "render_text",
    "renderable",
]

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
            "", "used (all processes)", f"{format_bytes(gpu.used)}  {percent(gpu.used, gpu.total)}"
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
    """The trials in the order they ran: size, passed ✓/✗, peak memory, seconds."""
    table = Table(
        title=f"Probe on {probe.device} (sizes {probe.lower}…{probe.upper})", box=box.SIMPLE_HEAD
    )
    table.add_column("#", justify="right")
    table.add_column("size", justify="right")
    table.add_column("passed")
    table.add_column("peak allocated", justify="right")
    table.add_column("peak reserved", justify="right")
    table.add_column("seconds", justify="right")
    for i, trial in enumerate(probe.trials, start=1):
        passed = (
            Text("✓", style="green")
            if trial.passed
            else Text(f"✗ {trial.failure or ''}".rstrip(), style="red")
        )
        table.add_row(
            str(i),
            str(trial.size),
            passed,
            format_bytes(trial.peak_allocated),
            format_bytes(trial.peak_reserved),
            f"{trial.seconds:.3f}",
        )
    return table


def probe_renderable(probe: ProbeResult) -> RenderableType:
    """The trial table, then what the search concluded."""
    if probe.choice:
        margin = "the fastest plan's, under the margin"
    elif probe.max_micro < probe.largest_pass:
        margin = f"less a {probe.margin:.0%} margin"
    elif probe.margin and not probe.hit_limit:
        margin = "no margin: nothing ran out of memory"
    elif probe.margin:
        margin = f"no margin needed: {probe.margin:.0%} of memory already spare"
    else:
        margin = "no margin"
    summary = (
        f"largest that passed: {probe.largest_pass}; max_micro {probe.max_micro} ({margin}); "
        f"limited by {probe.limited_by}; {len(probe.trials)} trials in {probe.seconds:.2f} s"
    )
    on = [f"probed on {probe.probed_on}"] if probe.probed_on else []
    choice = [probe.choice] if probe.choice else []
    lines = [Text(line) for line in (*on, summary, *probe.notes, *choice)]
    return Group(probe_table(probe), *lines, Text(UNITS, style="dim"))


def plan_renderable(plan: Plan) -> Text:
    """One line: ``Plan: target_batch 256 = 86+85+85 (accum_iter 3) × 1 rank``."""
    text = Text("Plan: ", style="bold")
    text.append(plan.describe())
    return text


# --------------------------------------------------------------------------- breakdown


def memory_bar(b: MemoryBreakdown, width: int = 60) -> Text:
    """A bar of the capacity: fixed / other / activations / outside torch / headroom."""
    segments = [(name, max(0, value)) for name, value in b.segments()]
    widths = bar_widths([v for _, v in segments], width)
    bar = Text("[")
    for (name, _), w in zip(segments, widths, strict=True):
        char, style = SEGMENT_LOOK[name]
        bar.append(char * w, style=style)
    bar.append("]")
    if b.capacity is not None:
        bar.append(f" {format_bytes(b.capacity)}")
    else:
        bar.append(" capacity unknown: proportions of the known parts")
    legend = Text()
    for name, value in segments:
        char, style = SEGMENT_LOOK[name]
        if len(legend):
            legend.append("  ")
        legend.append(char, style=style)
        legend.append(f" {name} {format_bytes(value)}")
    return Text("\n").join([bar, legend])


def _fixed_what(b: MemoryBreakdown) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in b.fixed_parts if v)


def memory_glance(b: MemoryBreakdown) -> RenderableType:
    """Memory at the plan in three lines: what the capacity is, the bar, its legend."""
    head = Text(f"memory at micro_batch {b.plan.micro_batch} ({b.capacity_source}):")
    return Group(head, memory_bar(b))


def breakdown_renderable(b: MemoryBreakdown) -> RenderableType:
    """The composition table, the bar, and the facts behind the plan. Where nothing of the
    device was measured (the CPU: no activations, nothing outside torch), no table of the
    host's RAM: the fixed part in one line, and the reasons."""
    if b.activations is None and b.outside_torch is None:
        fixed = f"fixed {format_bytes(b.fixed)} ({_fixed_what(b)})" if b.fixed else "fixed unknown"
        head = Text(
            f"Memory at micro_batch {b.plan.micro_batch}: {fixed}; activations not measured"
        )
        return Group(head, *_reasons(b))
    table = Table(
        title=f"Memory at micro_batch {b.plan.micro_batch}", box=box.SIMPLE_HEAD, caption=UNITS
    )
    table.add_column("part")
    table.add_column("bytes", justify="right")
    table.add_column("of capacity", justify="right")
    table.add_column("what")
    rows = [
        ("fixed", b.fixed, _fixed_what(b) or "params + grads + optimizer state"),
        ("other", b.other, "at the peak, not growing with the batch (workspaces, ...)"),
        ("activations", b.activations, f"per-sample memory × {b.plan.micro_batch}"),
        ("outside torch", b.outside_torch, "CUDA context, other processes"),
        ("headroom", b.headroom, "left free"),
    ]
    for name, value, what in rows:
        if value is None:
            continue
        table.add_row(name, format_bytes(value), percent(value, b.capacity), what)
    table.add_row("capacity", format_bytes(b.capacity), "", b.capacity_source)
    return Group(table, memory_bar(b), *_reasons(b))


def _reasons(b: MemoryBreakdown) -> list[Text]:
    lines = [Text("Why this plan", style="bold")]
    lines.extend(Text(f"  {line}") for line in b.reasons)
    lines.extend(Text(f"note: {n}", style="dim") for n in b.notes)
    return lines


# --------------------------------------------------------------------------- fit result


def fit_renderable(result: FitResult, *, full: bool = True) -> RenderableType:
    """A run's summary: what training did (:func:`~autoaccum.render.text.fit_lines`) and,
    where memory was measured, memory at the plan at a glance. ``full``: the plan, the
    probe's trials, the end-of-run memory snapshot and the breakdown with its reasons too."""
    lines: list[RenderableType] = [Text(line) for line in fit_lines(result)]
    if not full:
        if memory_measured(result) and result.breakdown is not None:
            lines.append(memory_glance(result.breakdown))
        return Group(*lines)
    parts: list[RenderableType] = [plan_renderable(result.plan)]
    if result.probe is not None:
        parts.append(probe_renderable(result.probe))
    parts.extend(lines)
    if result.memory is not None:
        parts.append(memory_report_renderable(result.memory))
    if result.breakdown is not None:  # its "fixed" row lists the footprint
        parts.append(breakdown_renderable(result.breakdown))
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
    if isinstance(obj, PeakLine):
        return Text(
            f"peak = {format_bytes(obj.fixed)} + {format_bytes(obj.per_sample)}/sample × b "
            f"(r² {obj.r2:.4f})"
        )
    raise TypeError(f"autoaccum.render cannot draw a {type(obj).__name__}")


def print_report(obj: object, console: Console | None = None) -> None:
    """Print any autoaccum result object (see :func:`renderable`)."""
    (console or Console()).print(renderable(obj))


def print_plan(
    plan: Plan, probe: ProbeResult | None, origin: str = "probe", console: Console | None = None
) -> None:
    """Print the plan in one line, and why (what :func:`autoaccum.fit` shows once it is made)."""
    text = Text(plan_line(plan, probe, origin))
    text.stylize("bold", 0, len("plan:"))
    (console or Console()).print(text, soft_wrap=True)


def print_fit_report(
    result: FitResult, console: Console | None = None, *, full: bool = True
) -> None:
    """Print the summary of a :func:`autoaccum.fit` run (``full``: every table too)."""
    (console or Console()).print(fit_renderable(result, full=full), soft_wrap=not full)


def render_text(obj: object, width: int = 100) -> str:
    """``obj`` rendered as plain text (no colour, no terminal), ``width`` columns wide."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None)
    console.print(obj if isinstance(obj, (str, Text)) else renderable(obj))
    return buffer.getvalue()
