"""Precision: resolve "auto", open the autocast context, build the (possibly disabled) scaler."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from autoaccum.errors import ConfigError

__all__ = ["PRECISIONS", "autocast", "make_scaler", "resolve_precision"]

PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"`` for ``device``.

    ``"auto"`` is bf16 autocast on CUDA devices that support it, fp32 elsewhere.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"precision='fp16' needs a CUDA device (loss scaling with GradScaler), but training "
            f"runs on {device}; use precision='fp32' or 'bf16' there"
        )
    return precision


def autocast(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """The autocast context for a resolved precision; a no-op for fp32."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is simply disabled unless the precision is fp16."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
