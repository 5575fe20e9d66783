"""The words and numbers of the drawings, without drawing: units, shares, bar widths, the
lines that sum up a run. Plain strings, so they are tested without a console."""

from __future__ import annotations

from autoaccum.memory.explain import format_bytes
from autoaccum.results import FitResult

__all__ = ["SEGMENT_LOOK", "UNITS", "bar_widths", "fit_lines", "format_bytes", "percent"]

#: The unit legend printed under every table that shows bytes.
UNITS = "units: GiB = 2^30 bytes, MiB = 2^20 bytes, KiB = 2^10 bytes"

#: Bar segments: (character, style). Distinct characters keep the bar readable without colour.
SEGMENT_LOOK = {
    "fixed": ("█", "blue"),
    "other": ("▓", "magenta"),
    "activations": ("▒", "yellow"),
    "outside torch": ("░", "red"),
    "headroom": ("·", "green"),
}


def percent(part: float | None, whole: float | None) -> str:
    if part is None or not whole:
        return ""
    return f"{100 * part / whole:.1f}%"


def bar_widths(values: list[int], width: int) -> list[int]:
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


def fit_lines(result: FitResult) -> list[str]:
    """What a run did, in a few lines: the loss, the counts and time, what changed."""
    if result.losses:
        first, last = result.losses[0], result.losses[-1]
        lines = [f"loss: {first:.4g} → {last:.4g} (first → last optimizer step)"]
    else:
        lines = ["loss: no optimizer step was taken"]
    skipped = f", {result.skipped_steps} skipped (fp16 overflow)" if result.skipped_steps else ""
    rate = f", {result.samples_seen / result.seconds:.1f} samples/s" if result.seconds > 0 else ""
    lines.append(
        f"{result.optimizer_steps} optimizer steps{skipped}, {result.samples_seen} samples, "
        f"{result.epochs} epochs, {result.seconds:.2f} s{rate}; {result.precision} on "
        f"{result.device}"
    )
    if result.oom_retries:
        lines.append(
            f"ran out of memory {result.oom_retries}× during training: those windows were "
            "re-run smaller; the plan above is the one in force at the end"
        )
    if result.resizes:
        changes = ", ".join(
            f"{r.old}→{r.new} at step {r.step} (epoch {r.epoch}, window {r.window}, {r.reason})"
            for r in result.resizes
        )
        lines.append(f"micro-batch changes during training: {changes}")
    if result.samples_dropped:
        lines.append(f"{result.samples_dropped} samples were not trained (see the warnings)")
    if result.breakdown is None and result.footprint:
        fp = ", ".join(
            f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in result.footprint.items() if v
        )
        lines.append(f"footprint: {fp}")
    return lines
