"""Draw the demo's probe as an SVG for the docs: ``python docs/_ext/probe_figure.py``.

It runs the probe ``autoaccum demo`` runs on the CPU (the demo's MLP in an emulated device of
0.8 MiB) and draws every trial's peak memory against its micro-batch size, the peak line
through the passing trials, the device's limit, the share the margin keeps spare, and the
sizes that came out: the largest that passed, the ceiling after the margin and the plan's
micro-batch. Plain SVG, no plotting library; the numbers are the probe's own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import autoaccum
from autoaccum.emulate import MemoryBudget
from autoaccum.memory.peaks import peak_line

OUT = Path(__file__).resolve().parent.parent / "img" / "probe-demo.svg"
W, H = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 30, 60
KIB = 1024


def demo_probe() -> autoaccum.ProbeResult:
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(2, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
        nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 3),
    )  # fmt: skip
    fixed = 4 * sum(p.numel() * p.element_size() for p in mlp.parameters())
    model = MemoryBudget(mlp, budget_bytes=int(0.8 * 2**20), fixed_bytes=fixed)
    batch = (torch.randn(256, 2), torch.randint(0, 3, (256,)))
    return autoaccum.probe(model, batch, upper=256)


def draw(result: autoaccum.ProbeResult, micro_batch: int) -> str:
    limit = result.limit_bytes
    line = peak_line(result.trials)
    if limit is None or line is None:
        raise SystemExit("the probe measured no memory: nothing to draw")
    x_max = max(t.size for t in result.trials) * 1.1
    y_min, y_max = line.fixed * 0.95, limit * 1.04

    def x(size: float) -> float:
        return LEFT + (W - LEFT - RIGHT) * size / x_max

    def y(value: float) -> float:
        return TOP + (H - TOP - BOTTOM) * (1 - (value - y_min) / (y_max - y_min))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="black"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="black"/>',
        f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 20}" text-anchor="middle">'
        "micro-batch size (samples)</text>",
        f'<text x="18" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 18 {(TOP + H - BOTTOM) / 2})">peak memory (KiB)</text>',
    ]
    for tick in range(0, int(x_max) + 1, 20):
        parts.append(
            f'<text x="{x(tick)}" y="{H - BOTTOM + 16}" text-anchor="middle">{tick}</text>'
        )
    step = 50 * KIB
    for value in range(int(y_min // step + 1) * step, int(y_max), step):
        parts.append(
            f'<text x="{LEFT - 6}" y="{y(value) + 4}" text-anchor="end">{value // KIB}</text>'
        )
    # the limit, and the share the margin keeps spare under it
    spare = limit * (1 - result.margin)
    parts += [
        f'<rect x="{LEFT}" y="{y(limit)}" width="{W - LEFT - RIGHT}" '
        f'height="{y(spare) - y(limit)}" fill="#f4c7c3"/>',
        f'<line x1="{LEFT}" y1="{y(limit)}" x2="{W - RIGHT}" y2="{y(limit)}" stroke="#c62828"/>',
        f'<text x="{LEFT + 6}" y="{y(limit) - 5}" fill="#c62828">limit {limit / KIB:.1f} KiB '
        f"(the emulated device); shaded: the {result.margin:.0%} margin kept spare</text>",
    ]
    # the peak line through the passing trials
    parts.append(
        f'<line x1="{x(0)}" y1="{y(line.predict(0))}" x2="{x(x_max)}" '
        f'y2="{y(line.predict(int(x_max)))}" stroke="#1565c0" stroke-dasharray="6 4"/>'
    )
    parts.append(
        f'<text x="{x(x_max * 0.33)}" y="{y(line.predict(int(x_max * 0.33))) + 24}" '
        f'fill="#1565c0">peak line: {line.fixed / KIB:.0f} KiB + '
        f"{line.per_sample / KIB:.1f} KiB/sample</text>"
    )
    # the sizes that came out
    labels = (
        (result.largest_pass, f"largest pass {result.largest_pass}", "#2e7d32", 0),
        (result.max_micro, f"max_micro {result.max_micro}", "#6a1b9a", 16),
        (micro_batch, f"micro-batch {micro_batch}", "#ef6c00", 32),
    )
    for size, _, colour, _ in labels:
        parts.append(
            f'<line x1="{x(size)}" y1="{TOP}" x2="{x(size)}" y2="{H - BOTTOM}" '
            f'stroke="{colour}" stroke-dasharray="2 3"/>'
        )
    for size, label, colour, dy in labels:
        parts.append(
            f'<text x="{x(size) - 4}" y="{y(line.fixed + 0.55 * (limit - line.fixed)) + dy}" '
            'text-anchor="end" '
            f'fill="{colour}">{label}</text>'
        )
    # the trials, in the order they ran: numbered at the point, listed at the right
    listing = []
    for number, trial in enumerate(result.trials, start=1):
        peak = trial.peak_allocated or 0
        colour = "#2e7d32" if trial.passed else "#c62828"
        dy = -8 if number % 2 else 18  # neighbours alternate above and below
        parts.append(f'<circle cx="{x(trial.size)}" cy="{y(peak)}" r="4" fill="{colour}"/>')
        parts.append(
            f'<text x="{x(trial.size)}" y="{y(peak) + dy}" text-anchor="middle" '
            f'fill="{colour}">#{number}</text>'
        )
        outcome = "passed" if trial.passed else trial.failure or "failed"
        samples = f"{trial.size} sample{'s' if trial.size > 1 else ''}"
        listing.append((f"#{number}: {samples}, {peak / KIB:.1f} KiB, {outcome}", colour))
    for row, (text, colour) in enumerate(listing):
        parts.append(
            f'<text x="{LEFT + 15}" y="{TOP + 60 + 16 * row}" fill="{colour}">{text}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> None:
    result = demo_probe()
    plan = autoaccum.make_plan(256, result.max_micro)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(draw(result, plan.micro_batch))
    sizes = ", ".join(f"{t.size}{'' if t.passed else ' (oom)'}" for t in result.trials)
    print(f"wrote {OUT}: trials {sizes}; {plan.describe()}", file=sys.stderr)


if __name__ == "__main__":
    main()
