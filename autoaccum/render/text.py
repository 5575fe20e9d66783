"""The words and numbers of the drawings, without drawing: units, shares, bar widths, the
plan in one line and why, the lines that sum up a run. Plain strings, so they are tested
without a console."""

from __future__ import annotations

from autoaccum.formats import counted, format_bytes
from autoaccum.plan import Plan
from autoaccum.results import FitResult, ProbeResult

__all__ = [
    "SEGMENT_LOOK",
    "UNITS",
    "bar_widths",
    "fit_lines",
    "format_bytes",
    "memory_measured",
    "percent",
    "plan_line",
    "plan_why",
]

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


def _margin(probe: ProbeResult) -> str:
    if probe.max_micro < probe.largest_pass:
        return f", less a {probe.margin:.0%} margin: max_micro {probe.max_micro}"
    return f": max_micro {probe.max_micro}"


def plan_why(plan: Plan, probe: ProbeResult | None, origin: str = "probe") -> str:
    """Why the plan is what it is, in a few words: what fitted where, or who set the ceiling.
    ``origin`` says where the plan came from: ``"probe"``, ``"max_micro"`` (the user's
    ceiling) or ``"checkpoint"`` (a resumed run's)."""
    if origin == "checkpoint":
        return "the checkpoint's plan, probed on this device"
    if plan.tokens:
        return _budget_why(plan, probe, origin)
    if probe is None or origin == "max_micro":
        fits = ": the whole window fits under it" if plan.accum_iter == 1 else ""
        return f"max_micro {plan.max_micro} given{fits}"
    measured = probe.limit_bytes is not None
    if not probe.hit_limit and plan.accum_iter == 1:
        if not measured and not probe.device.startswith("cuda"):
            why = f"the CPU has no device memory limit, and host memory holds {plan.per_rank}"
        else:
            why = f"nothing ran out of memory on {probe.device} up to {probe.upper}"
        return f"the whole window fits: {why} samples at once"
    if not probe.hit_limit:  # the host's memory capped the sizes on a CPU, or the fastest plan
        why = probe.notes[0] if probe.notes and not measured else f"max_micro {probe.max_micro}"
    else:
        where = probe.device if probe.device.startswith("cuda") else "the emulated device"
        limit = f"'s {format_bytes(probe.limit_bytes)}" if measured else ""
        why = f"{probe.largest_pass} fit in {where}{limit}{_margin(probe)}"
    if probe.chosen is not None and probe.chosen != probe.max_micro:
        why += f"; {probe.chosen} is the fastest plan's micro-batch under it"
    return why


def _budget_why(plan: Plan, probe: ProbeResult | None, origin: str) -> str:
    """Why a budget of padded tokens (target_tokens) is what it is: so many of the longest
    samples fitted, or were given."""
    if probe is None or origin == "max_micro":
        return f"max_micro {plan.max_micro} given: that many of the longest sample"
    if not probe.hit_limit:
        where = probe.device if probe.limit_bytes is None else "the emulated device"
        return f"nothing ran out of memory on {where} up to {probe.upper} of the longest samples"
    where = probe.device if probe.device.startswith("cuda") else "the emulated device"
    limit = f"'s {format_bytes(probe.limit_bytes)}" if probe.limit_bytes is not None else ""
    return f"{probe.largest_pass} of the longest samples fit in {where}{limit}{_margin(probe)}"


def plan_line(plan: Plan, probe: ProbeResult | None, origin: str = "probe") -> str:
    """The plan in one line, and why: what ``fit`` prints on every device once it is made."""
    return f"plan: {plan.describe()} — {plan_why(plan, probe, origin)}"


def memory_measured(result: FitResult) -> bool:
    """Whether the run measured device memory (a CUDA device, an emulated one): only then is
    a memory breakdown worth showing by default."""
    probed = result.probe is not None and result.probe.limit_bytes is not None
    return result.breakdown is not None and (probed or result.device.startswith("cuda"))


def fit_lines(result: FitResult) -> list[str]:
    """What a run did, in a few lines: the counts, time and loss, and what went differently
    (out-of-memory recoveries, micro-batch changes, samples left out, skipped steps)."""
    rate = f" ({result.samples_seen / result.seconds:,.0f} samples/s)" if result.seconds > 0 else ""
    epochs = f" ({counted(result.epochs, 'epoch')})" if result.epochs > 1 else ""
    losses = result.losses
    loss = f"; loss {losses[0]:.4g} → {losses[-1]:.4g}" if losses else ""
    lines = [
        f"done: {counted(result.optimizer_steps, 'optimizer step')}{epochs}, "
        f"{counted(result.samples_seen, 'sample')} in {result.seconds:.1f} s{rate}{loss}; "
        f"{result.precision} on {result.device}"
    ]
    if result.skipped_steps:
        lines.append(f"{counted(result.skipped_steps, 'step')} skipped (fp16 overflow)")
    if result.oom_retries:
        lines.append(
            f"ran out of memory {result.oom_retries}× during training: those windows were "
            "re-run smaller, nothing of them had reached the weights"
        )
    if result.resizes:
        changes = ", ".join(
            f"{r.old}→{r.new} at step {r.step} (epoch {r.epoch}, window {r.window}, {r.reason})"
            for r in result.resizes
        )
        lines.append(f"micro-batch changes: {changes}; plan at the end: {result.plan.describe()}")
    if result.samples_dropped:
        lines.append(f"{counted(result.samples_dropped, 'sample')} not trained (see the warnings)")
    if result.stopped_early:
        lines.append("stopped early: a callback asked")
    if result.evaluations:
        last = result.evaluations[-1]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float))
        lines.append(f"evaluation at step {last.get('step')}: {shown}")
    return lines
