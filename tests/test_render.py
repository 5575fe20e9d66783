"""Drawing: tables and bars as plain text, units labelled, every figure and reason taken from
the data (never computed here); what fit prints (the plan in one line and why, a short summary,
memory only where it was measured); results that read in one line in a REPL."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from torch.utils.data import DataLoader, TensorDataset

import autoaccum
from autoaccum.emulate import MemoryBudget, training_bytes
from autoaccum.memory.collect import memory_report
from autoaccum.memory.explain import explain, format_bytes
from autoaccum.memory.peaks import peak_line
from autoaccum.plan import make_plan
from autoaccum.render import print_fit_report, print_report, render_text, renderable
from autoaccum.render.tables import memory_bar
from autoaccum.render.text import bar_widths, plan_line, plan_why
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


def test_cpu_breakdown_says_activations_not_measurable_without_an_empty_table():
    probe = ProbeResult(16, 16, (TrialRecord(8, True, 0.1), TrialRecord(16, True, 0.1)), 1, 16)
    assert peak_line(probe.trials) is None
    host = HostMemory(24 * GiB, 20 * GiB, GiB, None, "no cgroup")
    report = MemoryReport("cpu", None, "the device is cpu", None, "as for the GPU", host, None)
    text = render_text(explain(probe, make_plan(16, 16), {"parameters": MiB}, report))
    assert "Memory at micro_batch 16: fixed 1.0 MiB (parameters 1.0 MiB); activations not" in text
    assert "not measurable on cpu" in text
    assert "Why this plan" in text
    # no table of the host's RAM that says nothing: "headroom 100%", a bar of one part
    assert "headroom" not in text
    assert "%" not in text
    assert "[" not in text


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
    assert "done: 40 optimizer steps (2 epochs), 10,240 samples in 12.5 s (819 samples/s)" in text
    assert "loss 2.303 → 0.4321" in text
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
    assert "done: 0 optimizer steps, 0 samples in 0.0 s; fp32 on cpu" in text
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


# --------------------------------------------------------------------------- what fit prints


def _emulated() -> tuple[torch.nn.Module, DataLoader[Any]]:
    """A small model on an emulated device of 20 KiB: 27 samples fit, a window of 64 does not."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 3))
    data = TensorDataset(torch.randn(128, 2), torch.randint(0, 3, (128,)))
    return MemoryBudget(net, 20 * 2**10, training_bytes(net)), DataLoader(data, batch_size=32)


def _cpu() -> tuple[torch.nn.Module, DataLoader[Any]]:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(96, 5), torch.randint(0, 3, (96,)))
    return torch.nn.Linear(5, 3), DataLoader(data, batch_size=16)


def test_fit_on_the_cpu_prints_the_plan_and_why_then_a_short_summary(
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, loader = _cpu()
    autoaccum.fit(model, loader, 32, device="cpu", progress=False, epochs=2)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines  # nothing else: no memory tables the CPU cannot fill
    assert lines[0] == (
        "plan: target_batch 32 = 32 × 1 (accum_iter 1) × 1 rank — the whole window fits: the "
        "CPU has no device memory limit, and host memory holds 32 samples at once"
    )
    assert re.fullmatch(
        r"done: 6 optimizer steps \(2 epochs\), 192 samples in [\d.]+ s \([\d,]+ samples/s\); "
        r"loss [\d.]+ → [\d.]+; fp32 on cpu",
        lines[1],
    ), lines[1]


def test_fit_says_one_epoch_and_which_ceiling_was_given(capsys: pytest.CaptureFixture[str]) -> None:
    model, loader = _cpu()
    autoaccum.fit(model, loader, 32, device="cpu", progress=False, max_micro=10)
    out = capsys.readouterr().out
    assert out.startswith(
        "plan: target_batch 32 = 8 × 4 (accum_iter 4) × 1 rank — max_micro 10 given\n"
    )
    assert "epochs" not in out
    assert "(1 epoch)" not in out  # a single epoch goes without saying


def test_fit_on_an_emulated_device_shows_memory_at_the_plan_in_three_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, loader = _emulated()
    result = autoaccum.fit(model, loader, 64, device="cpu", progress=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "plan: target_batch 64 = 22+21+21 (accum_iter 3) × 1 rank — 27 fit in the emulated "
        "device's 20.0 KiB, less a 2% margin: max_micro 26"
    )
    assert lines[1].startswith("done: 2 optimizer steps, 128 samples in ")
    assert lines[2] == (
        "memory at micro_batch 22 (the emulated device's limit for this process, measured by "
        "the probe):"
    )
    assert lines[3].startswith("[█")
    assert lines[3].endswith("] 20.0 KiB")
    assert lines[4].startswith("█ fixed 6.1 KiB  ▒ activations")  # 4 × 1,548 bytes
    assert len(lines) == 5
    assert result.probe is not None
    assert result.probe.hit_limit


def test_report_full_adds_every_table_and_false_prints_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, loader = _emulated()
    autoaccum.fit(model, loader, 64, device="cpu", progress=False, report="full")
    out = capsys.readouterr().out
    for part in ("plan: target_batch 64", "Probe on cpu", "✗ oom", "done: 2 optimizer steps"):
        assert part in out, part
    for part in ("Memory on cpu", "RAM total", "Memory at micro_batch 22", "Why this plan"):
        assert part in out, part
    model, loader = _emulated()
    autoaccum.fit(model, loader, 64, device="cpu", progress=False, report=False)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("report", ["summary", 1, None])
def test_a_report_that_is_neither_true_false_nor_full_is_refused_first(report: Any) -> None:
    model, loader = _cpu()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(autoaccum.ConfigError, match=r"report must be True .*'full'.* or False"):
        autoaccum.fit(model, loader, 32, device="cpu", progress=False, report=report)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def _gpu_probe(**changes: Any) -> ProbeResult:
    trials = (TrialRecord(1, True, 0.1, GiB), TrialRecord(96, True, 0.1, 70 * GiB))
    trials += (TrialRecord(97, False, 0.1, None, None, None, "oom"),)
    probe = ProbeResult(96, 91, trials, 1, 256, 0.02, "cuda:0", limit_bytes=80 * GiB)
    return replace(probe, **changes)


def test_the_plan_line_says_what_fitted_where() -> None:
    plan = make_plan(256, 91)
    assert plan_line(plan, _gpu_probe()) == (
        "plan: target_batch 256 = 86+85+85 (accum_iter 3) × 1 rank — 96 fit in cuda:0's "
        "80.00 GiB, less a 2% margin: max_micro 91"
    )
    fastest = _gpu_probe(chosen=64, choice="64 × 4: 1,020 samples/s")
    assert plan_why(make_plan(256, 64), fastest).endswith(
        "max_micro 91; 64 is the fastest plan's micro-batch under it"
    )
    no_margin = _gpu_probe(max_micro=96)
    assert plan_why(make_plan(256, 96), no_margin) == "96 fit in cuda:0's 80.00 GiB: max_micro 96"
    roomy = _gpu_probe(trials=(TrialRecord(256, True, 0.1, GiB),), largest_pass=256, max_micro=256)
    assert plan_why(make_plan(256, 256), roomy) == (
        "the whole window fits: nothing ran out of memory on cuda:0 up to 256 samples at once"
    )
    assert plan_why(plan, _gpu_probe(), "checkpoint") == (
        "the checkpoint's plan, probed on this device"
    )
    assert plan_why(plan, None, "max_micro") == "max_micro 91 given"
    capped = ProbeResult(
        40, 40, (TrialRecord(1, True, 0.1), TrialRecord(40, True, 0.1)), 1, 256,
        notes=("the CPU has no device limit to search: sizes were capped at 40 by host memory",),
    )  # fmt: skip
    assert plan_why(make_plan(256, 40), capped) == capped.notes[0]


def test_results_read_in_one_line_in_a_repl() -> None:
    assert repr(make_plan(256, 91)) == (
        "Plan(target_batch 256 = 86+85+85 (accum_iter 3) × 1 rank; max_micro 91)"
    )
    assert repr(make_plan(10, 4, min_micro=2)).endswith("max_micro 4, min_micro 2)")
    assert repr(_gpu_probe()) == (
        "ProbeResult(max_micro 91: 96 passed, less a 2% margin, limited by memory (80.00 GiB); "
        "3 trials on cuda:0 in 0.30 s: 1 ✓, 96 ✓, 97 ✗)"
    )
    assert repr(_gpu_probe().trials[2]) == "TrialRecord(97 ✗ oom, 0.100 s)"
    assert repr(_gpu_probe().trials[1]) == "TrialRecord(96 ✓, peak 70.00 GiB, 0.100 s)"
    assert repr(_report()) == (
        "MemoryReport(cuda:0: NVIDIA H100 80GB HBM3, 70.00 GiB free of 80.00 GiB; torch holds "
        "3.00 GiB (reserved 4.00 GiB, peak 9.00 GiB); host 14.00 GiB available of 128.00 GiB, "
        "this process 3.00 GiB)"
    )
    result = FitResult(
        plan=make_plan(256, 91),
        probe=_gpu_probe(),
        optimizer_steps=1,
        samples_seen=12000,
        losses=(2.5, 0.75),
        epochs=1,
        seconds=3.25,
        precision="bf16",
        device="cuda:0",
        oom_retries=1,
        resizes=(Resize(3, 0, 2, 91, 80, "oom"),),
        samples_dropped=3,
    )
    assert repr(result) == (
        "FitResult(1 optimizer step, 12,000 samples, 1 epoch in 3.2 s, loss 2.5 → 0.75; "
        "target_batch 256 = 86+85+85 (accum_iter 3) × 1 rank, bf16 on cuda:0; 1 window re-run "
        "after running out of memory; 1 micro-batch change; 3 samples not trained)"
    )
    assert "ProbeResult(" not in repr(result)  # one line, not the nested dumps


def test_the_cpu_probe_note_gives_bytes_per_sample_in_a_readable_unit() -> None:
    from autoaccum.memory.host import host_ceiling

    _, why = host_ceiling(256, saved_per_sample=18, available=20 * GiB, margin=0.02)
    assert "(20.0 GiB of host memory available, about 36 B per sample measured)" in why


RANKS_FIT = """
import torch, autoaccum
torch.manual_seed(0)
data = [(torch.randn(8, 5), torch.randint(0, 3, (8,))) for _ in range(4)]
autoaccum.fit(torch.nn.Linear(5, 3), data, 8, max_micro=2, device="cpu", progress=False, timeout=60)
"""


@pytest.mark.distributed
def test_fit_prints_on_the_first_rank_only(tmp_path: Path) -> None:
    """Two gloo ranks from torchrun's variables: the plan and the summary once, on rank 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    procs, outs = [], [tmp_path / "rank0.out", tmp_path / "rank1.out"]
    for rank, out in enumerate(outs):
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
        env.update(WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        with out.open("w") as handle:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", RANKS_FIT],
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    first, second = (out.read_text() for out in outs)
    assert codes == [0, 0], first + second
    assert first.splitlines()[0] == (
        "plan: target_batch 8 = 2 × 2 (accum_iter 2) × 2 ranks — max_micro 2 given"
    )
    assert first.count("plan:") == 1
    assert first.count("done: 8 optimizer steps, 64 samples") == 1  # both ranks counted
    assert second == ""
