"""The only place that knows what an out-of-memory error looks like.

Detection is by type first (``torch.OutOfMemoryError``), then by one table of known
messages, following ``__cause__`` and ``__context__``. Sticky CUDA errors (an
illegal memory access, a device-side assert) poison the CUDA context; they are never
taken for an out-of-memory error and always propagate.
"""

from __future__ import annotations

import gc
import re
from typing import Literal

import torch

from autoaccum.device import cuda_initialized

__all__ = [
    "OOM_MESSAGES",
    "OOM_TYPE",
    "SIZE_LIMIT_MESSAGES",
    "free_memory",
    "is_oom",
    "oom_kind",
    "requested_bytes",
]

#: The exception torch raises when an allocation fails (``torch.OutOfMemoryError``).
OOM_TYPE: type[BaseException] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

#: Substrings of errors raised when an allocation failed, by backend.
OOM_MESSAGES: tuple[str, ...] = (
    "CUDA out of memory",  # torch's caching allocator on CUDA
    "HIP out of memory",  # ROCm
    "XPU out of memory",  # Intel GPUs
    "CUDA error: out of memory",  # cudaMalloc failing outside the allocator (kernels, NCCL, cuDNN)
    "CUBLAS_STATUS_ALLOC_FAILED",  # cuBLAS could not allocate its workspace
    "CUDNN_STATUS_ALLOC_FAILED",  # cuDNN likewise
    "MPS backend out of memory",  # Apple silicon
    "DefaultCPUAllocator: can't allocate memory",  # host memory
)

#: Errors that mean "this batch size cannot run" without being an allocation failure:
#: cuDNN refuses some kernels above a size (32-bit indexing, workspace limits). The same
#: text can also mean a genuine bug (a non-contiguous input), so a search treats it as a
#: size limit only when a smaller size has passed; at the smallest size it propagates.
SIZE_LIMIT_MESSAGES: tuple[str, ...] = ("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED",)

#: Errors after which the CUDA context is unusable. Never retried.
_STICKY_MESSAGES: tuple[str, ...] = (
    "illegal memory access",
    "device-side assert",
    "misaligned address",
    "unspecified launch failure",
    "an illegal instruction",
)

OomKind = Literal["oom", "size_limit"]


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors it was raised from: its ``__cause__``, and its ``__context__``
    unless the raiser suppressed it (``raise ... from None`` says "not because of that")."""
    seen: list[BaseException] = []
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        stack.append(current.__cause__)
        if not current.__suppress_context__:
            stack.append(current.__context__)
    return seen


def oom_kind(exc: BaseException) -> OomKind | None:
    """``"oom"`` for an allocation failure, ``"size_limit"`` for a cuDNN size refusal, else None."""
    chain = _chain(exc)
    messages = [str(e) for e in chain]
    if any(sticky in msg for msg in messages for sticky in _STICKY_MESSAGES):
        return None
    if any(isinstance(e, OOM_TYPE) for e in chain):
        return "oom"
    for error, msg in zip(chain, messages, strict=True):
        if not isinstance(error, (RuntimeError, MemoryError)):
            continue
        if isinstance(error, MemoryError) or any(m in msg for m in OOM_MESSAGES):
            return "oom"
        if any(m in msg for m in SIZE_LIMIT_MESSAGES):
            return "size_limit"
    return None


def is_oom(exc: BaseException) -> bool:
    """True when ``exc`` (or an error it was raised from) means the batch did not fit in memory.

    cuDNN's ``CUDNN_STATUS_NOT_SUPPORTED`` counts too (see :data:`SIZE_LIMIT_MESSAGES`);
    sticky CUDA errors never do.
    """
    return oom_kind(exc) is not None


def free_memory(device: torch.device | None = None, *, collect: bool = True) -> None:
    """Return cached, unreferenced memory to the device after a failed or finished trial.

    Call it *outside* any ``except`` block: while an exception is being handled its
    traceback pins the failed frames and every tensor they reference. ``collect`` runs
    a full garbage collection first (about 0.15 s in a process with torch loaded), which
    frees tensors held only by reference cycles.
    """
    if collect:
        gc.collect()
    kind = device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and cuda_initialized():
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    elif kind == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


_TRIED = re.compile(r"Tried to allocate ([0-9.]+) ?(B|KiB|MiB|GiB|TiB)")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def requested_bytes(message: str) -> int | None:
    """The size of the allocation that failed, read from torch's out-of-memory message
    (``"Tried to allocate 2.00 GiB"``); None when the message does not say."""
    match = _TRIED.search(message)
    if match is None:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2)])
