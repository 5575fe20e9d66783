"""Where the memory went: collection only (torch, NVML, psutil, cgroups). Never prints.

:func:`memory_report` takes a snapshot of the GPU (NVML, matched to the torch device
by UUID so ``CUDA_VISIBLE_DEVICES`` is respected), torch's caching allocator and the
host (RAM, this process's RSS, the cgroup limit of a container). :func:`footprint`
measures the fixed tensors of training; :func:`fit_activation` fits the probe's peaks
to ``fixed + per_sample · b``; :func:`breakdown` explains the chosen plan. Rendering
lives in :mod:`autoaccum.report`.

Every figure is in bytes. A part that cannot be collected is ``None`` with a ``*_why``
string beside it; nothing here raises because a GPU, NVML or a cgroup is missing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoaccum.plan import Plan
from autoaccum.search import ProbeResult

__all__ = [
    "ActivationFit",
    "AllocatorMemory",
    "CgroupMemory",
    "GpuMemory",
    "HostMemory",
    "MemoryBreakdown",
    "MemoryReport",
    "breakdown",
    "cgroup_memory",
    "fit_activation",
    "footprint",
    "memory_report",
]

DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_PROC_CGROUP = "/proc/self/cgroup"
#: cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages, ~2^63); anything
#: this large is no limit.
_V1_UNLIMITED = 2**60


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
class CgroupMemory:
    """The memory cgroup that binds this process (a container's limit), in bytes."""

    version: int  #: 1 or 2
    path: str  #: the cgroup directory read
    limit: int | None  #: None: no limit ("max" in v2, a huge number in v1)
    usage: int | None  #: memory.current (v2) or memory.usage_in_bytes (v1)

    @property
    def remaining(self) -> int | None:
        """Bytes left under the limit; None without a limit."""
        if self.limit is None:
            return None
        return max(0, self.limit - (self.usage or 0))

    def to_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "path": self.path,
            "limit": self.limit,
            "usage": self.usage,
            "remaining": self.remaining,
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
    index = dev.index if dev.index is not None else torch.cuda.current_device()
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


# --------------------------------------------------------------------------- cgroups


def _own_cgroup_paths(proc_cgroup: str | os.PathLike[str] | None) -> tuple[str, str]:
    """(v2 path, v1 memory path) of this process from /proc/self/cgroup; "/" when unknown."""
    v2, v1 = "/", "/"
    if proc_cgroup is None:
        return v2, v1
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path or "/"
        elif "memory" in controllers.split(","):
            v1 = path or "/"
    return v2, v1


def _up_from(base: Path, rel: str) -> list[Path]:
    """``base/rel`` and its parents up to ``base``; just ``base`` when ``base/rel`` is absent
    (a container that shows the host's cgroup path but mounts only its own cgroup)."""
    leaf = base / rel.strip("/")
    if not leaf.is_dir():
        return [base]
    dirs = [leaf]
    while dirs[-1] != base and base in dirs[-1].parents:
        dirs.append(dirs[-1].parent)
    return dirs


def _read_int(path: Path) -> int | None:
    if not path.is_file():
        return None
    text = path.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path} holds {text!r}, not a number of bytes") from None


def _read_limit(path: Path, version: int) -> int | None:
    text = path.read_text().strip()
    if version == 2 and text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{path} holds {text!r}, not a memory limit") from None
    if value < 0 or value >= _V1_UNLIMITED:  # v1's "unlimited" (and -1 in some kernels)
        return None
    return value


def _tightest(version: int, dirs: Iterable[Path], limit_file: str, usage_file: str) -> CgroupMemory:
    found = [
        CgroupMemory(
            version=version,
            path=str(d),
            limit=_read_limit(d / limit_file, version),
            usage=_read_int(d / usage_file),
        )
        for d in dirs
        if (d / limit_file).is_file()
    ]
    limited = [c for c in found if c.limit is not None]
    if not limited:
        return found[0]
    return min(limited, key=lambda c: c.remaining if c.remaining is not None else 0)


def cgroup_memory(
    root: str | os.PathLike[str] = DEFAULT_CGROUP_ROOT,
    *,
    proc_cgroup: str | os.PathLike[str] | None = DEFAULT_PROC_CGROUP,
) -> CgroupMemory | None:
    """The memory cgroup that limits this process, read from the files under ``root``.

    cgroup v2: ``memory.max`` (``"max"`` is no limit) and ``memory.current``. cgroup v1:
    ``memory.limit_in_bytes`` (a value ≥ 2^60 is no limit) and ``memory.usage_in_bytes``,
    under ``root/memory`` or ``root`` itself. The process's own cgroup is found from
    ``proc_cgroup`` (``/proc/self/cgroup``; None: ``root`` itself) and every cgroup from it
    up to ``root`` is read: the one with the least room under its limit is returned, or
    the process's own one when none has a limit. None when no memory cgroup files exist.
    Raises ``OSError`` or ``ValueError`` for unreadable or malformed files.
    """
    base = Path(root)
    v2_path, v1_path = _own_cgroup_paths(proc_cgroup)
    dirs = [d for d in _up_from(base, v2_path) if (d / "memory.max").is_file()]
    if dirs:
        return _tightest(2, dirs, "memory.max", "memory.current")
    for v1_base in (base / "memory", base):
        if (v1_base / "memory.limit_in_bytes").is_file():
            dirs = _up_from(v1_base, v1_path)
            return _tightest(1, dirs, "memory.limit_in_bytes", "memory.usage_in_bytes")
    return None


# --------------------------------------------------------------------------- the footprint


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a rank really holds (the local shard of an FSDP2 DTensor)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _count_bytes(tensors: Iterable[torch.Tensor], seen: set[tuple[str, int]]) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once across calls."""
    total = 0
    for tensor in tensors:
        local = _local(tensor)
        try:
            storage = local.untyped_storage()
            key = (str(local.device), storage.data_ptr())
            nbytes = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (some subclasses)
            key, nbytes = (str(local.device), 0), local.nelement() * local.element_size()
        if key[1] == 0:  # meta or empty tensors share data_ptr 0: count each one
            key = ("id", id(local))
            nbytes = local.nelement() * local.element_size()
        if key in seen:
            continue
        seen.add(key)
        total += nbytes
    return total


def footprint(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of the fixed (batch-independent) tensors of training, measured from the tensors.

    Keys: ``parameters``, ``buffers``, ``optimizer_state`` and either ``gradients`` (the
    ``.grad`` tensors that exist now) or, when no parameter has a gradient yet,
    ``gradients_expected`` (the bytes of the trainable parameters: what backward will
    allocate). Storage shared between tensors (tied weights, views, a flat buffer) is
    counted once, in the first key that meets it, so ``sum(footprint(...).values())`` is
    the fixed memory. Optimizer state is measured as it is now: an optimizer that creates
    its state lazily (Adam) has none before its first step.
    """
    seen: set[tuple[str, int]] = set()
    params = list(model.parameters())
    result = {
        "parameters": _count_bytes(params, seen),
        "buffers": _count_bytes(model.buffers(), seen),
    }
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        result["gradients"] = _count_bytes(grads, seen)
    else:
        trainable = [p for p in params if p.requires_grad]
        result["gradients_expected"] = sum(
            _local(p).nelement() * _local(p).element_size() for p in trainable
        )
    state = optimizer.state.values() if optimizer is not None else ()
    result["optimizer_state"] = _count_bytes(_tensors(list(state)), seen)
    return result


# --------------------------------------------------------------------------- the activation fit


@dataclass(frozen=True)
class ActivationFit:
    """A least-squares line through the probe's peaks: ``peak(b) = fixed + per_sample · b``."""

    fixed: float  #: bytes at b = 0: everything that does not grow with the batch
    per_sample: float  #: bytes each sample adds (activations)
    r2: float  #: coefficient of determination (1.0 for a perfect line)
    max_residual: float  #: largest |measured − fitted| over the points, bytes
    points: tuple[tuple[int, int], ...]  #: (size, peak_allocated bytes) of the passing trials

    def predict(self, size: int) -> float:
        """The fitted peak at micro-batch ``size``, bytes."""
        return self.fixed + self.per_sample * size

    def to_dict(self) -> dict[str, object]:
        return {
            "fixed": self.fixed,
            "per_sample": self.per_sample,
            "r2": self.r2,
            "max_residual": self.max_residual,
            "points": [list(p) for p in self.points],
        }


def _peak_points(probe: ProbeResult) -> list[tuple[int, int]]:
    return [
        (t.size, t.peak_allocated) for t in probe.trials if t.fits and t.peak_allocated is not None
    ]


def fit_activation(probe: ProbeResult) -> ActivationFit | None:
    """The line ``peak_allocated(b) = fixed + per_sample · b`` over the probe's passing trials.

    None when fewer than two distinct sizes passed with a peak measured (the CPU records
    no peaks). Computed in exact rational arithmetic, so peaks that lie on a line give
    that line exactly.
    """
    points = _peak_points(probe)
    if len({size for size, _ in points}) < 2:
        return None
    n = len(points)
    sx = sum(s for s, _ in points)
    sy = sum(p for _, p in points)
    sxx = sum(s * s for s, _ in points)
    sxy = sum(s * p for s, p in points)
    slope = Fraction(n * sxy - sx * sy, n * sxx - sx * sx)
    intercept = Fraction(sy, n) - slope * Fraction(sx, n)
    residuals = [p - (intercept + slope * s) for s, p in points]
    ss_res = sum(r * r for r in residuals)
    mean = Fraction(sy, n)
    ss_tot = sum((p - mean) ** 2 for _, p in points)
    r2 = 1.0 if ss_tot == 0 else float(1 - ss_res / ss_tot)
    return ActivationFit(
        fixed=float(intercept),
        per_sample=float(slope),
        r2=r2,
        max_residual=float(max(abs(r) for r in residuals)),
        points=tuple(points),
    )


# --------------------------------------------------------------------------- the breakdown


@dataclass(frozen=True)
class MemoryBreakdown:
    """What device memory holds at the chosen plan, and why the plan is what it is.

    The segments ``fixed``, ``other``, ``activations``, ``outside_torch`` and ``headroom``
    add up to ``capacity`` whenever capacity is known (an unknown segment counts as 0).
    """

    capacity: int | None  #: device total (or the cgroup limit / host RAM on the CPU)
    capacity_source: str
    fixed: int | None  #: params + buffers + grads + optimizer state
    fixed_parts: tuple[tuple[str, int], ...]  #: the footprint, key by key
    other: int | None  #: batch-independent memory at the peak beyond ``fixed`` (fit intercept)
    activations: int | None  #: per_sample × micro_batch
    outside_torch: int | None  #: used on the device outside this process's allocator
    headroom: int | None  #: capacity − all of the above
    fit: ActivationFit | None
    # why this plan
    target_batch: int
    world_size: int
    micro_batch: int  #: the largest micro-batch of the plan
    accum_iter: int
    micro_sizes: tuple[int, ...]
    max_batch: int | None  #: the largest size that fitted (None: no probe ran)
    max_micro: int | None  #: max_batch less the margin: the plan's ceiling
    margin: float | None
    limited_by: str  #: "memory", "upper=N" or "max_micro (given by the user)"
    notes: tuple[str, ...] = field(default=())

    def segments(self) -> tuple[tuple[str, int], ...]:
        """(name, bytes) of each known non-empty part, headroom last: the bar's pieces."""
        named = (
            ("fixed", self.fixed),
            ("other", self.other),
            ("activations", self.activations),
            ("outside torch", self.outside_torch),
            ("headroom", self.headroom),
        )
        return tuple((name, value) for name, value in named if value)

    def to_dict(self) -> dict[str, object]:
        return {
            "capacity": self.capacity,
            "capacity_source": self.capacity_source,
            "fixed": self.fixed,
            "fixed_parts": dict(self.fixed_parts),
            "other": self.other,
            "activations": self.activations,
            "outside_torch": self.outside_torch,
            "headroom": self.headroom,
            "fit": self.fit.to_dict() if self.fit is not None else None,
            "target_batch": self.target_batch,
            "world_size": self.world_size,
            "micro_batch": self.micro_batch,
            "accum_iter": self.accum_iter,
            "micro_sizes": list(self.micro_sizes),
            "max_batch": self.max_batch,
            "max_micro": self.max_micro,
            "margin": self.margin,
            "limited_by": self.limited_by,
            "notes": list(self.notes),
        }

    def __rich__(self) -> object:
        return _rich(self)


def _capacity(
    report: MemoryReport | None, on_gpu: bool, notes: list[str]
) -> tuple[int | None, str, int | None]:
    """(capacity, where it came from, bytes used outside this process's allocator)."""
    if report is None:
        return None, "unknown (no memory report)", None
    if on_gpu and report.gpu is not None:
        outside = None
        if report.allocator is not None:
            outside = max(0, report.gpu.used - report.allocator.reserved)
        return report.gpu.total, f"{report.gpu.name} total ({report.gpu.source})", outside
    if on_gpu:
        notes.append(f"device capacity unknown: {report.gpu_why}")
        return None, "unknown", None
    host = report.host
    if host is None:
        return None, "unknown", None
    if host.cgroup is not None and host.cgroup.limit is not None and host.cgroup.limit < host.total:
        return host.cgroup.limit, "cgroup memory limit", None
    return host.total, "host RAM", None


def breakdown(
    probe: ProbeResult | None,
    plan: Plan,
    footprint: dict[str, int] | None = None,
    report: MemoryReport | None = None,
) -> MemoryBreakdown:
    """The composition of device memory at ``plan.micro_batch``, and why the plan is so.

    ``fixed`` is the footprint (else the probe's ``fixed_bytes``), ``activations`` is
    :func:`fit_activation`'s ``per_sample × plan.micro_batch``, ``other`` what the fit's
    intercept holds beyond ``fixed`` (workspaces, optimizer state created during the
    trials), ``outside_torch`` what the device has in use beyond this process's
    allocator (CUDA context, other processes) and ``headroom`` the rest of ``capacity``.
    With ``probe=None`` the sizes were forced by the user's ``max_micro``; on the CPU no
    peaks are recorded and activations are not measurable: both are said in ``notes``.
    """
    notes: list[str] = []
    parts = footprint if footprint is not None else (dict(probe.fixed_bytes) if probe else {})
    fixed: int | None = sum(parts.values()) if parts else None
    fit = fit_activation(probe) if probe is not None else None
    on_gpu = (
        probe.device.startswith("cuda")
        if probe is not None
        else (report is not None and report.device.startswith("cuda"))
    )
    activations: int | None = None
    other: int | None = None
    if probe is None:
        notes.append(
            f"no probe ran: the micro-batch sizes were forced by the user's max_micro, "
            f"so activation memory at micro_batch {plan.micro_batch} was not measured"
        )
    elif fit is not None:
        activations = max(0, round(fit.per_sample * plan.micro_batch))
        if fixed is None:
            fixed = max(0, round(fit.fixed))
            notes.append("fixed memory estimated from the fit's intercept (no footprint given)")
        else:
            other = max(0, round(fit.fixed) - fixed)
    else:
        points = _peak_points(probe)
        if not points:
            where = "on CPU" if not on_gpu else f"on {probe.device}"
            notes.append(
                f"activation memory was not measurable {where}: the probe recorded no peak "
                "memory (peaks are recorded on CUDA devices only)"
            )
        elif fixed is not None:
            size, peak = max(points)
            activations = max(0, round((peak - fixed) * plan.micro_batch / size))
            notes.append(
                f"activations estimated from one trial (size {size}): a line needs passing "
                "trials at two or more sizes"
            )
        else:
            notes.append("activation memory not estimated: one trial size only and no footprint")
    if "gradients_expected" in parts:
        notes.append("gradients not allocated yet: counted as the trainable parameters' bytes")
    capacity, source, outside = _capacity(report, on_gpu, notes)
    headroom = None
    if capacity is not None:
        used = sum(v or 0 for v in (fixed, other, activations, outside))
        headroom = capacity - used
        if headroom < 0:
            notes.append("the parts exceed the capacity: the snapshot and the probe disagree")
    return MemoryBreakdown(
        capacity=capacity,
        capacity_source=source,
        fixed=fixed,
        fixed_parts=tuple(parts.items()),
        other=other,
        activations=activations,
        outside_torch=outside,
        headroom=headroom,
        fit=fit,
        target_batch=plan.target_batch,
        world_size=plan.world_size,
        micro_batch=plan.micro_batch,
        accum_iter=plan.accum_iter,
        micro_sizes=plan.micro_sizes,
        max_batch=probe.max_batch if probe is not None else None,
        max_micro=probe.micro_batch if probe is not None else None,
        margin=probe.margin if probe is not None else None,
        limited_by=probe.limited_by if probe is not None else "max_micro (given by the user)",
        notes=tuple(notes),
    )
