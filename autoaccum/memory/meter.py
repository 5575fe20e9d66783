"""Per-trial memory readings for the search: peaks, allocator retries, the limit.

:func:`search_max_batch` reads memory through a :class:`Meter`, so its memory-guided
steps and the probe's headroom margin work on any device that reports memory (CUDA
here) and can be driven by a scripted meter in tests. A device that reports nothing
gets no meter, and the search falls back to doubling and bisection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from autoaccum.device import cuda_index

__all__ = ["CudaMeter", "Meter", "Reading", "meter_for"]


@dataclass(frozen=True)
class Reading:
    """What one trial used."""

    peak_allocated: int  #: bytes, the allocator's peak of live tensors
    peak_reserved: int  #: bytes, the allocator's peak of memory held from the device
    alloc_retries: int  #: times the allocator flushed its cache to satisfy a request


class Meter(Protocol):
    """Reads device memory around one trial at a time."""

    #: bytes this process may hold on the device (a per-process cap included)
    limit: int

    def start(self) -> None:
        """Reset the peaks; called just before a trial."""

    def stop(self) -> Reading:
        """The trial's peaks (waits for the device to finish its work)."""

    def allocated(self) -> int:
        """Bytes held by live tensors now."""


class CudaMeter:
    """A :class:`Meter` over torch's CUDA caching allocator for one device."""

    def __init__(self, device: torch.device) -> None:
        self.index = cuda_index(device)
        free, total = torch.cuda.mem_get_info(self.index)
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        fraction = float(get_fraction(self.index)) if get_fraction is not None else 1.0
        # What a set_per_process_memory_fraction cap allows, and no more than the device
        # has free now on top of what this process already holds (other processes count).
        reserved = torch.cuda.memory_reserved(self.index)
        self.limit = int(min(fraction * total, free + reserved))
        self._retries = 0

    def _retry_count(self) -> int:
        return int(torch.cuda.memory_stats(self.index).get("num_alloc_retries", 0))

    def start(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.index)
        self._retries = self._retry_count()

    def stop(self) -> Reading:
        torch.cuda.synchronize(self.index)
        return Reading(
            peak_allocated=int(torch.cuda.max_memory_allocated(self.index)),
            peak_reserved=int(torch.cuda.max_memory_reserved(self.index)),
            alloc_retries=self._retry_count() - self._retries,
        )

    def allocated(self) -> int:
        return int(torch.cuda.memory_allocated(self.index))


def meter_for(device: torch.device, model: nn.Module | None = None) -> Meter | None:
    """The meter for ``device``, or ``None`` where the device reports no memory (CPU).

    A module of ``model`` may bring its own meter through an ``autoaccum_meter()`` method
    (an emulated device, :class:`autoaccum.emulate.MemoryBudget`); it is read instead.
    """
    if model is not None:
        for module in model.modules():
            make = getattr(module, "autoaccum_meter", None)
            if callable(make):
                meter: Meter = make()
                return meter
    if device.type == "cuda" and torch.cuda.is_available():
        return CudaMeter(device)
    return None
