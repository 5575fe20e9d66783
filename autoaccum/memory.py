"""Where the memory went: collection only (torch, NVML, psutil, cgroups). Never prints.

:func:`memory_report` takes a snapshot of the GPU (NVML, matched to the torch device
by UUID so ``CUDA_VISIBLE_DEVICES`` is respected), torch's caching allocator and the
host (RAM, this process's RSS, the cgroup limit of a container, :mod:`autoaccum.cgroup`).
The fixed tensors of training are measured in :mod:`autoaccum.footprint`, the plan is
explained in :mod:`autoaccum.breakdown`, and rendering lives in :mod:`autoaccum.report`.

Every figure is in bytes. A part that cannot be collected is ``None`` with a ``*_why``
string beside it; nothing here raises because a GPU, NVML or a cgroup is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from autoaccum.cgroup import DEFAULT_CGROUP_ROOT, DEFAULT_PROC_CGROUP, CgroupMemory, cgroup_memory
from autoaccum.meter import cuda_index

__all__ = ["AllocatorMemory", "GpuMemory", "HostMemory", "MemoryReport", "memory_report"]


def _rich(obj: object) -> object:
    """The rich renderable of ``obj``, from report.py, imported only when rendering."""
    from autoaccum.report import renderable

    return renderable(obj)


# --------------------------------------------------------------------------- the snapshot


@dataclass(frozen=True)
class GpuMemory:
    """The whole GPU as the driver sees it (all processes), in bytes."""

    name: str
    index: int  #: the torch device index (after CUDA_VISIBLE_DEVICES)
    uuid: str | None
    total: int
    free: int
    used: int
    driver_version: str | None
    source: str  #: "nvml" or "torch.cuda.mem_get_info"

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "index": self.index,
            "uuid": self.uuid,
            "total": self.total,
            "free": self.free,
            "used": self.used,
            "driver_version": self.driver_version,
            "source": self.source,
        }


@dataclass(frozen=True)
class AllocatorMemory:
    """torch's CUDA caching allocator in this process, in bytes (``torch.cuda.memory_stats``)."""

    allocated: int  #: held by live tensors
    reserved: int  #: obtained from the driver (allocated + cached)
    peak_allocated: int
    peak_reserved: int
    num_alloc_retries: int  #: cudaMalloc failures retried after freeing the cache (pressure)
    num_ooms: int  #: out-of-memory errors raised

    @property
    def fragmentation(self) -> int:
        """Reserved but not allocated: cached blocks no tensor uses right now."""
        return max(0, self.reserved - self.allocated)

    def to_dict(self) -> dict[str, object]:
        return {
            "allocated": self.allocated,
            "reserved": self.reserved,
            "peak_allocated": self.peak_allocated,
            "peak_reserved": self.peak_reserved,
            "fragmentation": self.fragmentation,
            "num_alloc_retries": self.num_alloc_retries,
            "num_ooms": self.num_ooms,
        }


@dataclass(frozen=True)
class HostMemory:
    """Host RAM (psutil) and the cgroup limit that applies to this process, in bytes.

    Inside a container ``total`` and ``available`` describe the whole machine; the
    cgroup limit is what really bounds this process (see :attr:`effective_available`).
    """

    total: int
    available: int
    process_rss: int  #: resident memory of this process
    cgroup: CgroupMemory | None
    cgroup_why: str | None = None  #: why ``cgroup`` is None

    @property
    def effective_available(self) -> int:
        """RAM this process can still get: the smaller of ``available`` and the cgroup's room."""
        room = self.cgroup.remaining if self.cgroup is not None else None
        return self.available if room is None else min(self.available, room)

    def to_dict(self) -> dict[str, object]:
        return {
            "total": self.total,
            "available": self.available,
            "effective_available": self.effective_available,
            "process_rss": self.process_rss,
            "cgroup": self.cgroup.to_dict() if self.cgroup is not None else None,
            "cgroup_why": self.cgroup_why,
        }


@dataclass(frozen=True)
class MemoryReport:
    """A snapshot of device and host memory. Missing parts are None, with the reason beside."""

    device: str  #: the torch device described, e.g. "cuda:0" or "cpu"
    gpu: GpuMemory | None
    gpu_why: str | None
    allocator: AllocatorMemory | None
    allocator_why: str | None
    host: HostMemory | None
    host_why: str | None
    notes: tuple[str, ...] = ()  #: caveats, e.g. the NVML fallback that was used

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-able data (``json.dumps`` works on it)."""
        return {
            "device": self.device,
            "gpu": self.gpu.to_dict() if self.gpu is not None else None,
            "gpu_why": self.gpu_why,
            "allocator": self.allocator.to_dict() if self.allocator is not None else None,
            "allocator_why": self.allocator_why,
            "host": self.host.to_dict() if self.host is not None else None,
            "host_why": self.host_why,
            "notes": list(self.notes),
        }

    def __rich__(self) -> object:
        return _rich(self)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _error(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _bare_uuid(uuid: object) -> str:
    """A UUID without NVML's ``GPU-``/``MIG-`` prefix, lower case (torch prints it bare)."""
    text = _text(uuid).strip().lower()
    for prefix in ("gpu-", "mig-"):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


def _nvml_gpu(index: int, uuid: str | None, torch_name: str) -> GpuMemory:
    """The GPU with this torch UUID, from NVML; raises when NVML is unusable or finds none."""
    import pynvml  # type: ignore[import-untyped]

    if uuid is None:
        raise RuntimeError("torch reports no UUID for this device to match against NVML")
    pynvml.nvmlInit()
    try:
        wanted = _bare_uuid(uuid)
        handle = None
        for i in range(pynvml.nvmlDeviceGetCount()):
            candidate = pynvml.nvmlDeviceGetHandleByIndex(i)
            if _bare_uuid(pynvml.nvmlDeviceGetUUID(candidate)) == wanted:
                handle = candidate
                break
        if handle is None:  # a MIG instance is not among the physical devices
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(f"MIG-{wanted}")
            except pynvml.NVMLError:
                handle = None
        if handle is None:
            raise RuntimeError(f"no NVML device has the UUID {uuid} of cuda:{index}")
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            name = _text(pynvml.nvmlDeviceGetName(handle))
        except pynvml.NVMLError:
            name = torch_name
        try:
            driver: str | None = _text(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError:
            driver = None
        return GpuMemory(
            name=name,
            index=index,
            uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
            total=int(info.total),
            free=int(info.free),
            used=int(info.used),
            driver_version=driver,
            source="nvml",
        )
    finally:
        pynvml.nvmlShutdown()


def _torch_gpu(index: int, uuid: str | None, name: str) -> GpuMemory:
    free, total = torch.cuda.mem_get_info(index)
    return GpuMemory(
        name=name,
        index=index,
        uuid=uuid,
        total=int(total),
        free=int(free),
        used=int(total - free),
        driver_version=None,
        source="torch.cuda.mem_get_info",
    )


def _allocator(index: int) -> AllocatorMemory:
    stats = torch.cuda.memory_stats(index)

    def get(key: str) -> int:
        return int(stats.get(key, 0))

    return AllocatorMemory(
        allocated=get("allocated_bytes.all.current"),
        reserved=get("reserved_bytes.all.current"),
        peak_allocated=get("allocated_bytes.all.peak"),
        peak_reserved=get("reserved_bytes.all.peak"),
        num_alloc_retries=get("num_alloc_retries"),
        num_ooms=get("num_ooms"),
    )


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cuda_parts(
    dev: torch.device, notes: list[str]
) -> tuple[str, GpuMemory | None, str | None, AllocatorMemory | None, str | None]:
    """(device label, gpu, gpu_why, allocator, allocator_why) for a CUDA device."""
    if not torch.cuda.is_available():
        why = f"no CUDA device (torch.cuda.is_available() is False; torch {torch.__version__})"
        return str(dev), None, why, None, why
    initialised = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]  # before init
    index = cuda_index(dev)
    label = f"cuda:{index}"
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        why = f"{label} does not exist: this process sees {count} CUDA device(s)"
        return label, None, why, None, why
    props = torch.cuda.get_device_properties(index)
    uuid = str(props.uuid) if getattr(props, "uuid", None) is not None else None
    gpu: GpuMemory | None = None
    gpu_why: str | None = None
    try:
        gpu = _nvml_gpu(index, uuid, props.name)
    except Exception as exc:  # no library, no driver access, no matching device
        nvml_why = f"NVML not available: {_error(exc)}"
        try:
            gpu = _torch_gpu(index, uuid, props.name)
            notes.append(f"{nvml_why}; GPU figures from torch.cuda.mem_get_info, no driver version")
        except Exception as exc2:
            gpu_why = f"{nvml_why}; torch.cuda.mem_get_info failed: {_error(exc2)}"
    allocator: AllocatorMemory | None = None
    allocator_why: str | None = None
    if not initialised:
        allocator_why = "CUDA was not initialised in this process: torch has allocated nothing yet"
    else:
        try:
            allocator = _allocator(index)
        except Exception as exc:
            allocator_why = f"torch.cuda.memory_stats failed: {_error(exc)}"
    return label, gpu, gpu_why, allocator, allocator_why


def _host(
    cgroup_root: str | os.PathLike[str], proc_cgroup: str | os.PathLike[str] | None
) -> HostMemory:
    import psutil  # type: ignore[import-untyped]

    vm = psutil.virtual_memory()
    rss = psutil.Process().memory_info().rss
    cgroup: CgroupMemory | None = None
    why: str | None = None
    try:
        cgroup = cgroup_memory(cgroup_root, proc_cgroup=proc_cgroup)
        if cgroup is None:
            why = f"no memory cgroup found under {cgroup_root}"
    except (OSError, ValueError) as exc:
        why = f"cgroup memory files unreadable: {_error(exc)}"
    return HostMemory(
        total=int(vm.total),
        available=int(vm.available),
        process_rss=int(rss),
        cgroup=cgroup,
        cgroup_why=why,
    )


def memory_report(
    device: torch.device | str | None = None,
    *,
    cgroup_root: str | os.PathLike[str] = DEFAULT_CGROUP_ROOT,
    proc_cgroup: str | os.PathLike[str] | None = DEFAULT_PROC_CGROUP,
) -> MemoryReport:
    """A snapshot of ``device``'s memory (default: the current CUDA device, else the CPU).

    GPU totals come from NVML (``pynvml``), the device found by matching torch's UUID
    against NVML's, so ``CUDA_VISIBLE_DEVICES`` is respected; without NVML they come from
    ``torch.cuda.mem_get_info``. The allocator figures come from ``torch.cuda.memory_stats``
    (only when CUDA is already initialised in this process; CUDA is never initialised
    when it is not available). Host RAM and RSS come from psutil, the cgroup limit from
    ``cgroup_root`` (see :func:`cgroup_memory`). Never raises: a missing part is None
    with a ``*_why`` reason.
    """
    notes: list[str] = []
    label = str(device)
    gpu: GpuMemory | None = None
    allocator: AllocatorMemory | None = None
    gpu_why: str | None
    allocator_why: str | None
    try:
        dev = _resolve_device(device)
        label = str(dev)
        if dev.type == "cuda":
            label, gpu, gpu_why, allocator, allocator_why = _cuda_parts(dev, notes)
        else:
            gpu_why = allocator_why = f"the device is {dev}, not a CUDA device"
    except Exception as exc:
        gpu_why = allocator_why = f"cannot describe device {label}: {_error(exc)}"
    host: HostMemory | None = None
    host_why: str | None = None
    try:
        host = _host(cgroup_root, proc_cgroup)
    except Exception as exc:  # psutil missing or unsupported platform
        host_why = f"host memory unavailable: {_error(exc)}"
    return MemoryReport(
        device=label,
        gpu=gpu,
        gpu_why=gpu_why,
        allocator=allocator,
        allocator_why=allocator_why,
        host=host,
        host_why=host_why,
        notes=tuple(notes),
    )
