"""The probe as a figure (matplotlib, the ``plot`` extra): each trial's size against its peak
memory, the peak line through the passing trials, the device's limit and the margin kept
under it, and the micro-batch chosen. What ``autoaccum probe ... --plot probe.svg`` draws.

matplotlib is imported only when a figure is drawn, and without pyplot (no window, no
global state): :func:`check_plot` says before any work whether a figure can be written.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from autoaccum.errors import ConfigError, MissingExtraError
from autoaccum.formats import format_bytes
from autoaccum.memory.peaks import peak_line, peak_points
from autoaccum.plan import Plan
from autoaccum.results import ProbeResult

__all__ = ["FORMATS", "check_plot", "plot_probe"]

#: The file types a figure is written as, by suffix.
FORMATS = (".svg", ".png", ".pdf")


def check_plot(path: str | os.PathLike[str]) -> Path:
    """``path`` when a figure can be written there: matplotlib installed (else a
    :class:`MissingExtraError` with the pip line), a known suffix, an existing folder."""
    target = Path(path)
    if target.suffix.lower() not in FORMATS:
        raise ConfigError(
            f"cannot draw into {target}: name a {', '.join(FORMATS)} file, e.g. probe.svg"
        )
    if not target.parent.is_dir():
        raise ConfigError(f"cannot draw into {target}: the folder {target.parent} does not exist")
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingExtraError("plot", "matplotlib", "drawing the probe (--plot)")
    return target


def _scale(limit: float) -> tuple[float, str]:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if limit >= size:
            return size, unit
    return 1, "B"


def plot_probe(probe: ProbeResult, plan: Plan, path: str | os.PathLike[str]) -> Path:
    """Draw ``probe``'s trials against its memory limit into ``path`` (.svg, .png or .pdf).

    A :class:`ConfigError` when the probe measured no memory (a CPU without an emulated
    device records no peaks: there is nothing to draw)."""
    target = check_plot(path)
    points = peak_points(probe.trials)
    if not points or probe.limit_bytes is None:
        raise ConfigError(
            f"the probe on {probe.device} measured no memory, so there is nothing to draw: "
            "probe on a CUDA device, or on an emulated one (autoaccum probe --budget-mib N)"
        )
    try:
        from matplotlib import rc_context
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError("plot", "matplotlib", "drawing the probe (--plot)") from None
    limit = probe.limit_bytes
    unit, name = _scale(limit)
    with rc_context({"svg.fonttype": "none"}):  # text stays text in an SVG
        figure = Figure(figsize=(7.5, 4.5), layout="constrained")
        axes: Any = figure.add_subplot()
        _draw(axes, probe, plan, limit, unit)
        axes.set_xlabel("micro-batch size (samples)")
        axes.set_ylabel(f"peak memory ({name})")
        where = probe.device if probe.device.startswith("cuda") else "an emulated device"
        axes.set_title(f"probe on {where}: {plan.describe()}", fontsize=10)
        axes.legend(loc="lower right", fontsize=8)
        axes.grid(alpha=0.3)
        figure.savefig(target)
    return target


def _draw(axes: Any, probe: ProbeResult, plan: Plan, limit: int, unit: float) -> None:
    passed = [(t.size, t.peak_allocated) for t in probe.trials if t.passed and t.peak_allocated]
    failed = [(t.size, t.peak_allocated or limit) for t in probe.trials if not t.passed]
    top = max(t.size for t in probe.trials)
    line = peak_line(probe.trials)
    if line is not None:
        label = f"peak line: {format_bytes(line.fixed)} + {format_bytes(line.per_sample)}/sample"
        xs = [0, top * 1.05]
        ys = [(line.fixed + line.per_sample * x) / unit for x in xs]
        axes.plot(xs, ys, "--", color="tab:blue", label=label)
    axes.axhline(limit / unit, color="black", label=f"limit {format_bytes(limit)}")
    if probe.hit_limit and probe.margin:
        kept = limit * (1 - probe.margin)
        axes.axhline(
            kept / unit,
            color="tab:orange",
            linestyle=":",
            label=f"margin: {probe.margin:.0%} kept spare",
        )
    if passed:
        axes.scatter(*_scaled(passed, unit), color="tab:green", zorder=3, label="passed")
    if failed:
        axes.scatter(
            *_scaled(failed, unit), color="tab:red", marker="x", zorder=3, label="out of memory"
        )
    axes.axvline(
        probe.max_micro, color="tab:gray", linestyle=":", label=f"max_micro {probe.max_micro}"
    )
    axes.axvline(
        plan.micro_batch,
        color="tab:purple",
        linestyle="-.",
        label=f"micro_batch {plan.micro_batch} (accum_iter {plan.accum_iter})",
    )
    axes.set_xlim(0, top * 1.05)
    axes.set_ylim(0, limit / unit * 1.08)


def _scaled(points: list[tuple[int, int]], unit: float) -> tuple[list[int], list[float]]:
    return [size for size, _ in points], [peak / unit for _, peak in points]
