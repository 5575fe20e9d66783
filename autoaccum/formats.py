"""Writing results out: in words for people (bytes in binary units, counts with their noun)
and as plain JSON-ready data for programs. Pure functions, at the bottom of the package: the
result types' ``describe()`` and ``to_dict()`` and the renderer all use them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["counted", "field_dict", "format_bytes", "plain"]


def format_bytes(n: float | None) -> str:
    """``n`` bytes in binary units, labelled: ``"1.50 GiB"``, ``"12.0 MiB"``, ``"512 B"``."""
    if n is None:
        return "—"
    size = abs(n)
    if size >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if size >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if size >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{round(n)} B"


def counted(n: int, noun: str) -> str:
    """``n`` with its noun, singular for one: ``"1 epoch"``, ``"12,000 samples"``."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def plain(obj: Any) -> Any:
    """``obj`` as JSON-ready data: dataclasses and mappings as dicts, sequences as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        to_dict = getattr(obj, "to_dict", None)
        if callable(to_dict):
            return to_dict()
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def field_dict(obj: Any) -> dict[str, Any]:
    """A dataclass's own fields as plain data (what ``to_dict`` builds on)."""
    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
