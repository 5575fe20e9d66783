"""Where no device memory is measured (the CPU): how large a micro-batch the host can hold.

The CPU allocator has no limit to run into: a trial there fails only when the machine is
out of memory, often by the kernel killing the process rather than by an error. So the
probe does not climb on the CPU. It measures one small trial's activations (the bytes of
the tensors its forward saves for backward, counted with saved-tensor hooks), sizes the
largest micro-batch that keeps ``margin`` of the host's available memory (the cgroup's
limit included) spare, and tries that size next: one trial where the target fits, a
bisection below it where something (an emulated budget, a real allocation failure) says
it does not.
"""

from __future__ import annotations

import math
from types import TracebackType

import torch

from autoaccum.formats import format_bytes
from autoaccum.memory.collect import memory_report

__all__ = ["SavedBytes", "host_available", "host_ceiling"]

#: A trial's peak is about twice its saved activations (the backward's temporaries and the
#: activations' gradients live beside them); the host ceiling assumes that much.
PEAK_PER_SAVED = 2.0


class SavedBytes:
    """Counts the bytes of the tensors a block's forward saves for backward, parameters
    excluded (``with SavedBytes(model) as saved: ...; saved.total``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = {p.data_ptr() for p in model.parameters()}
        self.total = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.data_ptr() not in self.params:
            self.total += tensor.numel() * tensor.element_size()
        return tensor.detach()  # not the tensor itself: a saved output would hold its grad_fn

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._hooks.__exit__(exc_type, exc, tb)


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def host_available() -> int | None:
    """Bytes this process can still get from the host (RAM, bounded by its cgroup)."""
    host = memory_report("cpu").host
    return host.effective_available if host is not None else None


def host_ceiling(
    upper: int, *, saved_per_sample: float, available: int | None, margin: float
) -> tuple[int, str]:
    """The largest size up to ``upper`` whose activations keep ``margin`` of the host's
    available memory spare, and why, in words."""
    if available is None or saved_per_sample <= 0:
        return upper, "no host memory reading: the target was tried first"
    per_sample = PEAK_PER_SAVED * saved_per_sample
    fits = math.floor(available * (1 - margin) / per_sample)
    gib = available / 2**30
    if fits >= upper:
        return upper, (
            f"the CPU has no device limit to search: the target's micro-batch of {upper} was "
            f"tried first ({gib:.1f} GiB of host memory available, about "
            f"{format_bytes(per_sample)} per sample measured)"
        )
    ceiling = max(1, fits)
    return ceiling, (
        f"the CPU has no device limit to search: sizes were capped at {ceiling} by host memory "
        f"({gib:.1f} GiB available, about {format_bytes(per_sample)} per sample measured, "
        f"{margin:.0%} kept spare)"
    )
