"""Where the memory goes: collection (:mod:`~autoaccum.memory.collect`, with
:mod:`~autoaccum.memory.cgroup`), the fixed tensors of training
(:mod:`~autoaccum.memory.footprint`) and why a plan is what it is
(:mod:`~autoaccum.memory.explain`). Pure data; nothing here prints."""

from __future__ import annotations

from autoaccum.memory.collect import memory_report
from autoaccum.memory.explain import explain
from autoaccum.memory.footprint import footprint

__all__ = ["explain", "footprint", "memory_report"]
