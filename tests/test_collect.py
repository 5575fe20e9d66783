"""Memory collection: graceful without CUDA or NVML, NVML matched to torch by UUID, the
allocator read only once CUDA is initialised, the host and its cgroup."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
import torch

from autoaccum.memory.collect import memory_report
from autoaccum.results import AllocatorMemory

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
