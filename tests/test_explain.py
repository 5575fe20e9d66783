"""Why this plan: the peak line through the probe's trials, and memory at the plan split into
fixed, activations and headroom against the limit the probe really had."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from autoaccum.memory.collect import memory_report
from autoaccum.memory.explain import explain
from autoaccum.memory.peaks import peak_line
from autoaccum.plan import make_plan
from autoaccum.results import (
    AllocatorMemory,
    GpuMemory,
    HostMemory,
    MemoryReport,
    ProbeResult,
    TrialRecord,
)

CGROUP = Path(__file__).parent / "data" / "cgroup"
GiB = 2**30
MiB = 2**20
UUID = "5f3c1a2b-0000-1111-2222-333344445555"


FIXED = 3 * GiB + 12345
PER_SAMPLE = 40 * MiB + 7


def _probe(sizes_passed: list[tuple[int, bool]], *, peaks: bool = True, **kw: Any) -> ProbeResult:
    trials = tuple(
        TrialRecord(
            size,
            passed,
            0.1,
            peak_allocated=FIXED + PER_SAMPLE * size if peaks and passed else None,
            peak_reserved=FIXED + PER_SAMPLE * size + 64 * MiB if peaks and passed else None,
            failure=None if passed else "oom",
        )
        for size, passed in sizes_passed
    )
    best = max(s for s, f in sizes_passed if f)
    defaults: dict[str, Any] = {
        "largest_pass": best,
        "max_micro": best,
        "trials": trials,
        "lower": 1,
        "upper": 512,
        "device": "cuda:0" if peaks else "cpu",
    }
    defaults.update(kw)
    return ProbeResult(**defaults)


SEARCH = [(1, True), (2, True), (4, True), (8, True), (16, True), (32, True), (64, True)]
SEARCH += [(128, False), (96, True), (112, False), (104, True), (108, False), (106, True)]
SEARCH += [(107, False)]


def test_peak_line_recovers_a_line_exactly():
    line = peak_line(_probe(SEARCH).trials)
    assert line is not None
    assert line.fixed == FIXED
    assert line.per_sample == PER_SAMPLE
    assert line.r2 == 1.0
    assert line.max_residual == 0.0
    assert len(line.points) == 10  # failed trials carry no peak
    assert line.predict(100) == FIXED + 100 * PER_SAMPLE


def test_peak_line_needs_two_sizes_with_peaks():
    assert peak_line(_probe([(8, True), (16, False)]).trials) is None
    assert peak_line(_probe(SEARCH, peaks=False).trials) is None


def _report(total: int = 80 * GiB, used: int = 20 * GiB, reserved: int = 4 * GiB) -> MemoryReport:
    gpu = GpuMemory("H100", 0, UUID, total, total - used, used, "555", "nvml")
    alloc = AllocatorMemory(3 * GiB, reserved, 10 * GiB, 12 * GiB, 0, 0)
    host = HostMemory(64 * GiB, 32 * GiB, GiB, None, "no memory cgroup")
    return MemoryReport("cuda:0", gpu, None, alloc, None, host, None)


def test_explain_adds_up_to_capacity_and_explains_the_plan():
    probe = replace(_probe(SEARCH, margin=0.02), max_micro=103, margin=0.02)
    plan = make_plan(256, probe.max_micro)
    parts = {"parameters": GiB, "gradients": GiB, "optimizer_state": GiB // 2}
    b = explain(probe, plan, parts, _report())
    assert b.capacity == 80 * GiB
    assert b.fixed == GiB + GiB + GiB // 2
    assert b.other == FIXED - b.fixed
    assert b.activations == PER_SAMPLE * plan.micro_batch
    assert b.outside_torch == 16 * GiB  # used 20 GiB, 4 GiB of it reserved by torch
    assert b.fixed + b.other + b.activations + b.outside_torch + b.headroom == b.capacity
    assert sum(v for _, v in b.segments()) == b.capacity
    assert (b.largest_pass, b.max_micro, b.margin, b.limited_by) == (106, 103, 0.02, "memory")
    assert b.plan == plan
    assert "largest micro-batch that passed: 106 (limited by memory)" in b.reasons[0]
    assert "max_micro 103" in b.reasons[0]
    assert "86+85+85 (accum_iter 3)" in b.reasons[1]
    assert json.loads(json.dumps(b.to_dict()))["plan"]["micro_sizes"] == [86, 85, 85]


def test_explain_without_probe_says_the_sizes_were_forced():
    plan = make_plan(64, 16)
    b = explain(None, plan, {"parameters": GiB, "gradients_expected": GiB}, _report())
    assert b.largest_pass is None
    assert b.max_micro == 16
    assert b.activations is None
    assert "max_micro" in b.limited_by
    assert any("forced by the user's max_micro" in n for n in b.notes)
    assert any("gradients not allocated yet" in n for n in b.notes)
    assert b.fixed + b.outside_torch + b.headroom == b.capacity


def test_explain_on_cpu_says_activations_were_not_measurable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    probe = _probe(SEARCH, peaks=False)
    plan = make_plan(256, probe.max_micro)
    report = memory_report("cpu", cgroup_root=CGROUP / "v2_limited", proc_cgroup=None)
    b = explain(probe, plan, {"parameters": MiB}, report)
    assert b.activations is None
    assert any("not measurable on cpu" in n for n in b.notes)
    assert b.capacity_source == "cgroup memory limit"
    assert b.capacity == 8 * GiB
    assert b.fixed + b.headroom == b.capacity


def test_explain_single_trial_estimate_and_unknown_capacity():
    probe = _probe([(1, True), (2, False)])
    plan = make_plan(4, 1)
    b = explain(probe, plan, {"parameters": FIXED}, None)
    assert b.activations == PER_SAMPLE
    assert any("one trial" in n for n in b.notes)
    assert b.capacity is None
    assert b.headroom is None


def test_explain_measures_against_the_limit_the_probe_had_not_the_card():
    """Under a 24 GiB cap on an 80 GiB card the capacity is 24 GiB: headroom is what this
    process can still use, not the card's other 56 GiB."""
    probe = replace(_probe(SEARCH), limit_bytes=24 * GiB)
    plan = make_plan(256, probe.max_micro)
    b = explain(probe, plan, {"parameters": GiB}, _report())
    assert b.capacity == 24 * GiB
    assert "limit for this process" in b.capacity_source
    assert b.outside_torch is None  # other processes are outside this process's limit
    assert b.fixed + b.other + b.activations + b.headroom == 24 * GiB
    assert any("80.00 GiB" in n and "24.00 GiB" in n for n in b.notes)
    uncapped = explain(_probe(SEARCH), plan, {"parameters": GiB}, _report())
    assert uncapped.capacity == 80 * GiB
