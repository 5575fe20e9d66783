"""Output: table cells, markdown tables, the JSON and markdown files every benchmark writes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["fmt", "gib", "md_table", "mode_note", "write_outputs"]


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def gib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**30:.2f} GiB"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def write_outputs(out: Path, name: str, data: dict[str, Any], markdown: str) -> Path:
    """``out/name.json`` and ``out/name.md``; returns the JSON path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown + "\n")
    return path


def mode_note(tiny: bool) -> str:
    if tiny:
        return (
            "CPU tiny mode (smoke test, not a measurement): tiny models, OOM fault-injected "
            "by a micro-batch budget; times are CPU wall-clock on shared cores."
        )
    return (
        "GPU: times from CUDA events or whole synchronised runs (no sync inside a timed "
        "step); peak memory from torch's allocator."
    )
