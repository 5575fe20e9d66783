"""A snapshot of device and host memory: the GPU as the driver sees it, torch's caching
allocator in this process, the host's RAM and the cgroup that binds it. The frozen data
:func:`autoaccum.memory_report` returns (re-exported by :mod:`autoaccum.results`); reading
the device is :mod:`autoaccum.memory.collect`'s job, drawing it :mod:`autoaccum.render`'s."""

from __future__ import annotations

from dataclasses import dataclass

from autoaccum.formats import field_dict, format_bytes

__all__ = ["AllocatorMemory", "CgroupMemory", "GpuMemory", "HostMemory", "MemoryReport"]


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
        return {**field_dict(self), "remaining": self.remaining}


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
        return field_dict(self)


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
        return {**field_dict(self), "fragmentation": self.fragmentation}


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
        return {**field_dict(self), "effective_available": self.effective_available}


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

    def describe(self) -> str:
        """One line: the GPU (or why there is none), torch's allocator, the host's RAM."""
        gpu, alloc, host = self.gpu, self.allocator, self.host
        parts = [
            f"{gpu.name}, {format_bytes(gpu.free)} free of {format_bytes(gpu.total)}"
            if gpu is not None
            else f"no GPU ({self.gpu_why})"
        ]
        if alloc is not None:
            parts.append(
                f"torch holds {format_bytes(alloc.allocated)} (reserved "
                f"{format_bytes(alloc.reserved)}, peak {format_bytes(alloc.peak_allocated)})"
            )
        if host is not None:
            parts.append(
                f"host {format_bytes(host.effective_available)} available of "
                f"{format_bytes(host.total)}, this process {format_bytes(host.process_rss)}"
            )
        return f"{self.device}: {'; '.join(parts)}"

    def __repr__(self) -> str:
        return f"MemoryReport({self.describe()})"

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-able data (``json.dumps`` works on it)."""
        return field_dict(self)
