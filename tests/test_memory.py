"""Memory collection: graceful without CUDA/NVML, NVML matched by UUID, cgroups, fits."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
import torch
from torch import nn

from autoaccum.breakdown import breakdown, fit_activation
from autoaccum.cgroup import cgroup_memory
from autoaccum.footprint import footprint
from autoaccum.memory import AllocatorMemory, GpuMemory, HostMemory, MemoryReport, memory_report
from autoaccum.plan import make_plan
from autoaccum.search import ProbeResult, TrialRecord

CGROUP = Path(__file__).parent / "data" / "cgroup"
GiB = 2**30
MiB = 2**20
UUID = "5f3c1a2b-0000-1111-2222-333344445555"


def _forbid(*_args: object, **_kwargs: object) -> Any:
    raise AssertionError("must not be called")


def _nvml_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)


def _fake_cuda(
    monkeypatch: pytest.MonkeyPatch,
    *,
    initialised: bool = True,
    mem_get_info: Any = None,
    count: int = 1,
) -> dict[str, int]:
    """Pretend a CUDA device is present by patching every torch.cuda function memory.py uses."""
    stats = {
        "allocated_bytes.all.current": 3 * GiB,
        "reserved_bytes.all.current": 4 * GiB,
        "allocated_bytes.all.peak": 10 * GiB,
        "reserved_bytes.all.peak": 12 * GiB,
        "num_alloc_retries": 2,
        "num_ooms": 1,
    }
    props = SimpleNamespace(name="Fake GPU", uuid=UUID, total_memory=80 * GiB)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", mem_get_info or (lambda i: (60 * GiB, 80 * GiB))
    )
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda i: stats)
    return stats


class FakeNvml:
    """Two physical GPUs; the one torch sees (by UUID) is NVML's index 1."""

    def __init__(self, uuids: tuple[str, ...] = ("GPU-ffffffff-0000-0000-0000-000000000000",)):
        self.uuids = (*uuids, f"GPU-{UUID.upper()}")
        self.inits = 0
        self.shutdowns = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def init() -> None:
            self.inits += 1

        def shutdown() -> None:
            self.shutdowns += 1

        def by_uuid(uuid: str) -> int:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

        memory = [
            SimpleNamespace(total=80 * GiB, free=80 * GiB, used=0),
            SimpleNamespace(total=80 * GiB, free=50 * GiB, used=30 * GiB),
        ]
        patches = {
            "nvmlInit": init,
            "nvmlShutdown": shutdown,
            "nvmlDeviceGetCount": lambda: len(self.uuids),
            "nvmlDeviceGetHandleByIndex": lambda i: i,
            "nvmlDeviceGetHandleByUUID": by_uuid,
            "nvmlDeviceGetUUID": lambda h: self.uuids[h],
            "nvmlDeviceGetName": lambda h: f"NVIDIA H100 #{h}",
            "nvmlDeviceGetMemoryInfo": lambda h: memory[min(h, 1)],
            "nvmlSystemGetDriverVersion": lambda: "555.42.06",
        }
        for name, fn in patches.items():
            monkeypatch.setattr(pynvml, name, fn)


# --------------------------------------------------------------------------- no GPU


def test_report_without_cuda_or_nvml_never_initialises_cuda(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("get_device_properties", "mem_get_info", "memory_stats", "current_device"):
        monkeypatch.setattr(torch.cuda, name, _forbid)
    _nvml_absent(monkeypatch)

    report = memory_report()
    assert report.device == "cpu"
    assert report.gpu is None
    assert report.allocator is None
    assert "not a CUDA device" in (report.gpu_why or "")
    assert report.host is not None
    assert report.host.total > 0
    assert report.host.process_rss > 0
    json.dumps(report.to_dict())

    on_cuda = memory_report("cuda")
    assert on_cuda.gpu is None
    assert "no CUDA device" in (on_cuda.gpu_why or "")
    assert "no CUDA device" in (on_cuda.allocator_why or "")


def test_bad_device_string_is_reported_not_raised():
    report = memory_report("not-a-device")
    assert report.gpu is None
    assert "cannot describe device" in (report.gpu_why or "")
    assert report.host is not None


def test_report_falls_back_to_torch_when_nvml_is_missing(monkeypatch: pytest.MonkeyPatch):
    _fake_cuda(monkeypatch)
    _nvml_absent(monkeypatch)

    report = memory_report("cuda")
    assert report.device == "cuda:0"
    gpu = report.gpu
    assert gpu is not None
    assert (gpu.source, gpu.name, gpu.total, gpu.free, gpu.used) == (
        "torch.cuda.mem_get_info",
        "Fake GPU",
        80 * GiB,
        60 * GiB,
        20 * GiB,
    )
    assert gpu.driver_version is None
    assert any("NVML not available" in n for n in report.notes)
    assert report.allocator == AllocatorMemory(
        allocated=3 * GiB,
        reserved=4 * GiB,
        peak_allocated=10 * GiB,
        peak_reserved=12 * GiB,
        num_alloc_retries=2,
        num_ooms=1,
    )
    assert report.allocator.fragmentation == GiB
    json.dumps(report.to_dict())


def test_nvml_device_is_matched_by_uuid_and_nvml_is_shut_down(monkeypatch: pytest.MonkeyPatch):
    _fake_cuda(monkeypatch, mem_get_info=_forbid)
    nvml = FakeNvml()
    nvml.install(monkeypatch)

    gpu = memory_report("cuda:0").gpu
    assert gpu is not None
    # torch's cuda:0 is NVML's device 1 (as under CUDA_VISIBLE_DEVICES=1): matched by UUID
    assert gpu.name == "NVIDIA H100 #1"
    assert (gpu.total, gpu.free, gpu.used) == (80 * GiB, 50 * GiB, 30 * GiB)
    assert gpu.driver_version == "555.42.06"
    assert gpu.source == "nvml"
    assert gpu.index == 0
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_no_nvml_device_with_the_uuid_falls_back(monkeypatch: pytest.MonkeyPatch):
    _fake_cuda(monkeypatch)
    nvml = FakeNvml()
    nvml.uuids = ("GPU-00000000-0000-0000-0000-000000000000",)
    nvml.install(monkeypatch)

    report = memory_report("cuda")
    assert report.gpu is not None
    assert report.gpu.source == "torch.cuda.mem_get_info"
    assert any("no NVML device has the UUID" in n for n in report.notes)
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_gpu_missing_when_nvml_and_mem_get_info_both_fail(monkeypatch: pytest.MonkeyPatch):
    def broken(i: int) -> tuple[int, int]:
        raise RuntimeError("CUDA driver error")

    _fake_cuda(monkeypatch, mem_get_info=broken)
    _nvml_absent(monkeypatch)
    report = memory_report("cuda")
    assert report.gpu is None
    assert "NVML not available" in (report.gpu_why or "")
    assert "CUDA driver error" in (report.gpu_why or "")


def test_allocator_not_read_before_cuda_is_initialised(monkeypatch: pytest.MonkeyPatch):
    _fake_cuda(monkeypatch, initialised=False)
    monkeypatch.setattr(torch.cuda, "memory_stats", _forbid)
    _nvml_absent(monkeypatch)
    report = memory_report("cuda")
    assert report.allocator is None
    assert "not initialised" in (report.allocator_why or "")


def test_device_index_out_of_range(monkeypatch: pytest.MonkeyPatch):
    _fake_cuda(monkeypatch, count=1)
    report = memory_report("cuda:3")
    assert report.gpu is None
    assert "cuda:3 does not exist" in (report.gpu_why or "")


# --------------------------------------------------------------------------- cgroups


def test_cgroup_v2_limit():
    cg = cgroup_memory(CGROUP / "v2_limited", proc_cgroup=None)
    assert cg is not None
    assert (cg.version, cg.limit, cg.usage, cg.remaining) == (2, 8 * GiB, 2 * GiB, 6 * GiB)


def test_cgroup_v2_max_means_no_limit():
    cg = cgroup_memory(CGROUP / "v2_unlimited", proc_cgroup=None)
    assert cg is not None
    assert (cg.version, cg.limit, cg.usage, cg.remaining) == (2, None, 100 * MiB, None)


def test_cgroup_v1_limit_and_a_host_path_the_container_does_not_mount():
    # /proc/self/cgroup names /docker/abc123, which is not under the container's mount
    proc = CGROUP / "v1_docker.proc_self_cgroup"
    cg = cgroup_memory(CGROUP / "v1_limited", proc_cgroup=proc)
    assert cg is not None
    assert (cg.version, cg.limit, cg.usage, cg.remaining) == (1, 4 * GiB, GiB, 3 * GiB)


def test_cgroup_v1_huge_value_means_no_limit():
    cg = cgroup_memory(CGROUP / "v1_unlimited", proc_cgroup=None)
    assert cg is not None
    assert (cg.version, cg.limit, cg.usage) == (1, None, 50 * MiB)


def test_cgroup_tightest_ancestor_binds():
    root = CGROUP / "v2_nested"
    cg = cgroup_memory(root, proc_cgroup=CGROUP / "v2_nested.proc_self_cgroup")
    assert cg is not None
    assert Path(cg.path) == root / "parent"
    assert (cg.limit, cg.remaining) == (2 * GiB, 512 * MiB)


def test_cgroup_absent_or_malformed():
    assert cgroup_memory(CGROUP / "empty", proc_cgroup=None) is None
    with pytest.raises(ValueError, match="lots"):
        cgroup_memory(CGROUP / "malformed", proc_cgroup=None)


def test_report_uses_the_cgroup_root(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    host = memory_report(cgroup_root=CGROUP / "v2_limited", proc_cgroup=None).host
    assert host is not None
    assert host.cgroup is not None
    assert host.cgroup.limit == 8 * GiB
    assert host.effective_available == min(host.available, 6 * GiB)

    bad = memory_report(cgroup_root=CGROUP / "malformed", proc_cgroup=None).host
    assert bad is not None
    assert bad.cgroup is None
    assert "unreadable" in (bad.cgroup_why or "")

    none = memory_report(cgroup_root=CGROUP / "empty", proc_cgroup=None).host
    assert none is not None
    assert "no memory cgroup" in (none.cgroup_why or "")


# --------------------------------------------------------------------------- footprint


def test_footprint_counts_params_grads_and_optimizer_state():
    model = nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20), nn.Linear(20, 2))
    params = sum(p.numel() * 4 for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    opt = torch.optim.AdamW(model.parameters())

    before = footprint(model, opt)
    assert before == {
        "parameters": params,
        "buffers": buffers,
        "gradients_expected": params,
        "optimizer_state": 0,
    }

    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    after = footprint(model, opt)
    n_params = len(list(model.parameters()))
    assert after["gradients"] == params
    assert "gradients_expected" not in after
    # exp_avg and exp_avg_sq per parameter, plus a float32 scalar "step" each
    assert after["optimizer_state"] == 2 * params + 4 * n_params
    assert footprint(model)["optimizer_state"] == 0


def test_footprint_counts_shared_storage_once():
    embed = nn.Embedding(100, 8)
    head = nn.Linear(8, 100, bias=False)
    head.weight = embed.weight  # tied
    model = nn.ModuleDict({"embed": embed, "head": head})
    assert footprint(model)["parameters"] == 100 * 8 * 4

    frozen = nn.Linear(4, 4)
    frozen.bias.requires_grad_(False)
    fp = footprint(frozen)
    assert fp["gradients_expected"] == 16 * 4


# --------------------------------------------------------------------------- fit and breakdown


FIXED = 3 * GiB + 12345
PER_SAMPLE = 40 * MiB + 7


def _probe(sizes_fits: list[tuple[int, bool]], *, peaks: bool = True, **kw: Any) -> ProbeResult:
    trials = tuple(
        TrialRecord(
            size,
            fits,
            0.1,
            peak_allocated=FIXED + PER_SAMPLE * size if peaks and fits else None,
            peak_reserved=FIXED + PER_SAMPLE * size + 64 * MiB if peaks and fits else None,
            failure=None if fits else "oom",
        )
        for size, fits in sizes_fits
    )
    best = max(s for s, f in sizes_fits if f)
    defaults: dict[str, Any] = {
        "max_batch": best,
        "micro_batch": best,
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


def test_fit_activation_recovers_a_line_exactly():
    fit = fit_activation(_probe(SEARCH))
    assert fit is not None
    assert fit.fixed == FIXED
    assert fit.per_sample == PER_SAMPLE
    assert fit.r2 == 1.0
    assert fit.max_residual == 0.0
    assert len(fit.points) == 10  # failed trials carry no peak
    assert fit.predict(100) == FIXED + 100 * PER_SAMPLE


def test_fit_activation_needs_two_sizes_with_peaks():
    assert fit_activation(_probe([(8, True), (16, False)])) is None
    assert fit_activation(_probe(SEARCH, peaks=False)) is None


def _report(total: int = 80 * GiB, used: int = 20 * GiB, reserved: int = 4 * GiB) -> MemoryReport:
    gpu = GpuMemory("H100", 0, UUID, total, total - used, used, "555", "nvml")
    alloc = AllocatorMemory(3 * GiB, reserved, 10 * GiB, 12 * GiB, 0, 0)
    host = HostMemory(64 * GiB, 32 * GiB, GiB, None, "no memory cgroup")
    return MemoryReport("cuda:0", gpu, None, alloc, None, host, None)


def test_breakdown_adds_up_to_capacity_and_explains_the_plan():
    probe = replace(_probe(SEARCH, margin=0.02), micro_batch=103, margin=0.02)
    plan = make_plan(256, probe.micro_batch)
    parts = {"parameters": GiB, "gradients": GiB, "optimizer_state": GiB // 2}
    b = breakdown(probe, plan, parts, _report())
    assert b.capacity == 80 * GiB
    assert b.fixed == GiB + GiB + GiB // 2
    assert b.other == FIXED - b.fixed
    assert b.activations == PER_SAMPLE * plan.micro_batch
    assert b.outside_torch == 16 * GiB  # used 20 GiB, 4 GiB of it reserved by torch
    assert b.fixed + b.other + b.activations + b.outside_torch + b.headroom == b.capacity
    assert sum(v for _, v in b.segments()) == b.capacity
    assert (b.max_batch, b.max_micro, b.margin, b.limited_by) == (106, 103, 0.02, "memory")
    assert (b.target_batch, b.world_size, b.accum_iter, b.micro_sizes) == (256, 1, 3, (86, 85, 85))
    assert b.micro_batch == 86
    json.dumps(b.to_dict())


def test_breakdown_without_probe_says_the_sizes_were_forced():
    plan = make_plan(64, 16)
    b = breakdown(None, plan, {"parameters": GiB, "gradients_expected": GiB}, _report())
    assert b.max_batch is None
    assert b.activations is None
    assert "max_micro" in b.limited_by
    assert any("forced by the user's max_micro" in n for n in b.notes)
    assert any("gradients not allocated yet" in n for n in b.notes)
    assert b.fixed + b.outside_torch + b.headroom == b.capacity


def test_breakdown_on_cpu_says_activations_were_not_measurable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    probe = _probe(SEARCH, peaks=False)
    plan = make_plan(256, probe.micro_batch)
    report = memory_report("cpu", cgroup_root=CGROUP / "v2_limited", proc_cgroup=None)
    b = breakdown(probe, plan, {"parameters": MiB}, report)
    assert b.activations is None
    assert any("not measurable on CPU" in n for n in b.notes)
    assert b.capacity_source == "cgroup memory limit"
    assert b.capacity == 8 * GiB
    assert b.fixed + b.headroom == b.capacity


def test_breakdown_single_trial_estimate_and_unknown_capacity():
    probe = _probe([(1, True), (2, False)])
    plan = make_plan(4, 1)
    b = breakdown(probe, plan, {"parameters": FIXED}, None)
    assert b.activations == PER_SAMPLE
    assert any("one trial" in n for n in b.notes)
    assert b.capacity is None
    assert b.headroom is None
