"""Drawing: tables and bars as plain text, units labelled, every figure and reason taken from
the data (never computed here)."""

from __future__ import annotations

import io
import re
from dataclasses import replace

import pytest
import torch
from rich.console import Console

import autoaccum
from autoaccum.memory.collect import memory_report
from autoaccum.memory.explain import explain, format_bytes
from autoaccum.memory.peaks import peak_line
from autoaccum.plan import make_plan
from autoaccum.render import print_fit_report, print_report, render_text, renderable
from autoaccum.render.tables import memory_bar
from autoaccum.render.text import bar_widths
from autoaccum.results import (
    AllocatorMemory,
    CgroupMemory,
    FitResult,
    GpuMemory,
    HostMemory,
    MemoryReport,
    ProbeResult,
    Resize,
    TrialRecord,
)

GiB = 2**30
MiB = 2**20


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=100, color_system=None), buffer


def _probe() -> ProbeResult:
    def rec(size: int, fits: bool) -> TrialRecord:
        peak = 2 * GiB + size * 64 * MiB if fits else None
        return TrialRecord(
            size,
            fits,
            0.25,
            peak,
            peak + 100 * MiB if peak else None,
            None,
            None if fits else "oom",
        )

    trials = tuple(rec(s, f) for s, f in [(1, True), (2, True), (4, True), (8, False), (6, True)])
    trials += (rec(7, False),)
    return ProbeResult(6, 5, trials, 1, 64, margin=0.02, device="cuda:0")


def _report() -> MemoryReport:
    gpu = GpuMemory("NVIDIA H100 80GB HBM3", 0, "x", 80 * GiB, 70 * GiB, 10 * GiB, "555.42", "nvml")
    alloc = AllocatorMemory(3 * GiB, 4 * GiB, 9 * GiB, 10 * GiB, 1, 0)
    cg = CgroupMemory(2, "/sys/fs/cgroup", 16 * GiB, 2 * GiB)
    host = HostMemory(128 * GiB, 100 * GiB, 3 * GiB, cg)
    return MemoryReport("cuda:0", gpu, None, alloc, None, host, None, ("a caveat",))


def test_format_bytes_is_labelled_in_binary_units():
    assert format_bytes(3 * GiB // 2) == "1.50 GiB"
    assert format_bytes(12 * MiB) == "12.0 MiB"
    assert format_bytes(2048) == "2.0 KiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(-2 * GiB) == "-2.00 GiB"
    assert format_bytes(None) == "—"


def test_memory_report_table():
    text = render_text(_report())
    for expected in (
        "Memory on cuda:0",
        "NVIDIA H100 80GB HBM3",
        "80.00 GiB",
        "555.42",
        "fragmentation",
        "1.00 GiB",  # reserved − allocated
        "cgroup v2 limit",
        "16.00 GiB",
        "available to this process",
        "14.00 GiB",  # the cgroup's room, smaller than the host's 100 GiB
        "GiB = 2^30 bytes",
        "note: a caveat",
    ):
        assert expected in text, expected


def test_memory_report_without_gpu_says_why(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    text = render_text(memory_report("cuda"))
    assert "not available" in text
    assert "no CUDA device" in text
    assert "RAM total" in text
    assert "GiB" in text


def test_probe_table_lists_trials_in_order():
    text = render_text(_probe())
    rows = [line.split() for line in text.splitlines() if re.match(r"\s+\d+\s+\d+\s", line)]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("1", "1", "✓"),
        ("2", "2", "✓"),
        ("3", "4", "✓"),
        ("4", "8", "✗"),
        ("5", "6", "✓"),
        ("6", "7", "✗"),
    ]
    assert "✗ oom" in text
    assert "2.06 GiB" in text  # 2 GiB + 64 MiB at size 1
    assert "0.250" in text
    assert "largest that passed: 6" in text
    assert "max_micro 5 (less a 2% margin)" in text
    assert "limited by memory" in text
    assert "GiB = 2^30 bytes" in text


def test_plan_line():
    assert render_text(make_plan(256, 100)).strip() == (
        "Plan: target_batch 256 = 86+85+85 (accum_iter 3) × 1 rank"
    )
    assert "64 × 4 (accum_iter 4) × 2 ranks" in render_text(make_plan(512, 64, 2))


def test_breakdown_renders_table_bar_and_reasons():
    probe = _probe()
    plan = make_plan(64, probe.max_micro)
    b = explain(probe, plan, {"parameters": GiB, "gradients": GiB // 2}, _report())
    text = render_text(b)
    assert "Memory at micro_batch 5" in text
    for part in ("fixed", "other", "activations", "outside torch", "headroom", "capacity"):
        assert part in text
    bar = next(line for line in text.splitlines() if line.startswith("["))
    body = bar[1 : bar.index("]")]
    assert len(body) == 60
    assert {"█", "▓", "▒", "░", "·"} <= set(body)
    assert bar.endswith("80.00 GiB")
    assert "Why this plan" in text
    for reason in b.reasons:  # drawn as the data says, word for word
        assert reason in text.replace("\n", " ") or reason[:60] in text
    assert "largest micro-batch that passed: 6 (limited by memory); less a 2% margin" in text
    assert "peak line: peak = 2.00 GiB + 64.0 MiB/sample" in text
    assert "GiB = 2^30 bytes" in text


def test_breakdown_bar_proportions():
    b = explain(None, make_plan(8, 8), {"parameters": 3 * GiB}, _report())
    bar = memory_bar(b, width=80).plain.splitlines()[0]
    body = bar[1 : bar.index("]")]
    # 3 GiB fixed, 6 GiB outside torch (10 used − 4 reserved), 71 GiB headroom, of 80
    assert (body.count("█"), body.count("░"), body.count("·")) == (3, 6, 71)


def test_bar_widths_sum_and_slivers():
    assert sum(bar_widths([1, 2, 3, 1000], 50)) == 50
    assert all(w >= 1 for w in bar_widths([1, 2, 3, 1000], 50))
    assert bar_widths([0, 0], 10) == [0, 0]


def test_cpu_breakdown_says_activations_not_measurable():
    probe = ProbeResult(16, 16, (TrialRecord(8, True, 0.1), TrialRecord(16, True, 0.1)), 1, 16)
    assert peak_line(probe.trials) is None
    text = render_text(explain(probe, make_plan(16, 16), {"parameters": MiB}, None))
    assert "not measurable on cpu" in text
    assert "capacity unknown" in text


def test_fit_report():
    plan = make_plan(256, 100)
    footprint = {"parameters": 4 * MiB}
    result = FitResult(
        plan=plan,
        probe=_probe(),
        optimizer_steps=40,
        samples_seen=10240,
        losses=(2.3026, 1.5, 0.4321),
        epochs=2,
        seconds=12.5,
        precision="bf16",
        device="cuda:0",
        memory=_report(),
        footprint=footprint,
        breakdown=explain(_probe(), plan, footprint, _report()),
    )
    console, buffer = _console()
    print_fit_report(result, console=console)
    text = buffer.getvalue()
    assert "Plan: target_batch 256 = 86+85+85 (accum_iter 3) × 1 rank" in text
    assert "✗ oom" in text
    assert "loss: 2.303 → 0.4321" in text
    assert "40 optimizer steps, 10240 samples, 2 epochs, 12.50 s" in text
    assert "bf16 on cuda:0" in text
    assert "parameters 4.0 MiB" in text  # in the breakdown's fixed row
    assert "Memory on cuda:0" in text
    assert "Memory at micro_batch 86" in text
    assert "Why this plan" in text
    assert "largest micro-batch that passed: 6" in text


def test_print_report_draws_any_result_and_refuses_anything_else():
    console, buffer = _console()
    print_report(_report(), console)
    print_report(make_plan(10, 4), console)
    text = buffer.getvalue()
    assert "Memory on cuda:0" in text
    assert "Plan: target_batch 10 = 4+3+3" in text
    assert not hasattr(MemoryReport, "__rich__")  # the data does not know how it is drawn
    with pytest.raises(TypeError, match="cannot draw"):
        renderable(object())


def test_fit_report_without_memory_or_steps():
    result = FitResult(
        plan=make_plan(8, 8),
        probe=None,
        optimizer_steps=0,
        samples_seen=0,
        losses=(),
        epochs=0,
        seconds=0.0,
        precision="fp32",
        device="cpu",
        footprint={"parameters": 2048, "buffers": 0},
    )
    text = render_text(result)
    assert "loss: no optimizer step was taken" in text
    assert "footprint: parameters 2.0 KiB" in text
    assert "buffers" not in text


def test_fit_report_mentions_oom_retries_and_resizes() -> None:
    result = autoaccum.fit(
        torch.nn.Linear(4, 2),
        [(torch.randn(8, 4), torch.randint(0, 2, (8,)))],
        8,
        max_micro=4,
        device="cpu",
        progress=False,
        report=False,
    )
    console = Console(file=io.StringIO(), width=100, color_system=None)
    resized = replace(result, oom_retries=2, resizes=(Resize(3, 0, 2, 8, 7, "oom"),))
    print_fit_report(resized, console=console)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "ran out of memory 2× during training" in text
    assert "8→7 at step 3 (epoch 0, window 2, oom)" in text


def test_probe_summary_says_when_the_margin_needed_no_samples() -> None:
    kept = replace(_probe(), max_micro=6)  # the largest size already left 2% spare
    assert "max_micro 6 (no margin needed: 2% of memory already spare)" in render_text(kept)
    assert "(no margin)" in render_text(replace(kept, margin=0.0))
