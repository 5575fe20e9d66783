"""The device: checked before anything touches the model, and the CUDA facts the rest of the
package reads (whether CUDA is initialised, a device's index)."""

from __future__ import annotations

import torch

from autoaccum.errors import ConfigError

__all__ = ["check_device", "cuda_index", "cuda_initialized"]


def cuda_initialized() -> bool:
    """True once this process has created a CUDA context (never creates one)."""
    return bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]


def _available() -> str:
    kinds = ["cpu"]
    if torch.cuda.is_available():
        kinds.append(f"cuda:0..{torch.cuda.device_count() - 1}")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        kinds.append("mps")
    return ", ".join(kinds)


def check_device(device: object) -> torch.device:
    """``device`` as a ``torch.device`` this process can train on, or a :class:`ConfigError`
    saying what is available. Called before anything moves the model, so a bad device
    never leaves the weights half-moved (or, for ``meta``, destroyed)."""
    try:
        dev: torch.device = torch.device(device)  # type: ignore[call-overload]
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"device {device!r} is not a torch device ({exc}); available here: {_available()}"
        ) from None
    if dev.type == "meta":
        raise ConfigError(
            "device 'meta' holds no data and cannot train; pass a real device "
            f"(available here: {_available()})"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {str(dev)!r} was asked for, but this torch ({torch.__version__}) sees no "
                f"CUDA device; available here: {_available()}"
            )
        if dev.index is not None and not 0 <= dev.index < torch.cuda.device_count():
            raise ConfigError(
                f"device {str(dev)!r} does not exist: this process sees "
                f"{torch.cuda.device_count()} CUDA device(s) (CUDA_VISIBLE_DEVICES applies)"
            )
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device 'mps' is not available here; available: {_available()}")
    elif dev.type != "cpu":
        module = getattr(torch, dev.type, None)
        is_available = getattr(module, "is_available", None)
        if not callable(is_available) or not is_available():
            raise ConfigError(
                f"device {str(dev)!r} is not available here; available: {_available()}"
            )
    return dev


def cuda_index(device: torch.device) -> int:
    """The CUDA device's index; ``cuda`` alone means the current device. Some torch calls
    (``set_per_process_memory_fraction``) refuse a device without one."""
    return device.index if device.index is not None else torch.cuda.current_device()
