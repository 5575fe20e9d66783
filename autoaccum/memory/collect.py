"""Where the memory went: collection only (torch, NVML, psutil, cgroups). Never prints.

:func:`memory_report` takes a snapshot of the GPU (NVML, matched to the torch device
by UUID so ``CUDA_VISIBLE_DEVICES`` is respected), torch's caching allocator and the
host (RAM, this process's RSS, the cgroup limit of a container,
:mod:`autoaccum.memory.cgroup`). The fixed tensors of training are measured in
:mod:`autoaccum.memory.footprint`, the plan is explained in :mod:`autoaccum.memory.explain`,
and drawing lives in :mod:`autoaccum.render`.

Every figure is in bytes. A part that cannot be collected is ``None`` with a ``*_why``
string beside it; nothing here raises because a GPU, NVML or a cgroup is missing.
"""

from __future__ import annotations

import os

import torch

from autoaccum.device import cuda_index, cuda_initialized
from autoaccum.memory.cgroup import DEFAULT_CGROUP_ROOT, DEFAULT_PROC_CGROUP, cgroup_memory
from autoaccum.results import AllocatorMemory, CgroupMemory, GpuMemory, HostMemory, MemoryReport

__all__ = ["memory_report"]


# --------------------------------------------------------------------------- the snapshot


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
    initialised = cuda_initialized()  # before anything below initialises it
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
