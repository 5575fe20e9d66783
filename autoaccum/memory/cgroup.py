"""The memory cgroup that binds this process: a container's limit, from cgroup v1 or v2."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from autoaccum.results import CgroupMemory

__all__ = ["DEFAULT_CGROUP_ROOT", "DEFAULT_PROC_CGROUP", "cgroup_memory"]

DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_PROC_CGROUP = "/proc/self/cgroup"
#: cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages, ~2^63); anything
#: this large is no limit.
_V1_UNLIMITED = 2**60


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
