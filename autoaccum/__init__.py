"""autoaccum: memory-aware auto-batching for PyTorch.

Probe the largest micro-batch that fits, plan gradient accumulation so that
micro-batches × accum_iter × ranks equal the target batch exactly, and train with
one accumulating loop whose every optimizer step applies exactly the gradient of
one big batch. Nothing runs at import.

The pipeline reads from the package listing: :mod:`autoaccum.probing` (probe) →
:mod:`autoaccum.plan` → :mod:`autoaccum.train` (the loop and ``fit``), with
:mod:`autoaccum.memory` (where the memory goes, why this plan) and
:mod:`autoaccum.render` (drawing it) beside them.
"""

from __future__ import annotations

from autoaccum._version import __version__
from autoaccum.errors import (
    AutoAccumError,
    BatchError,
    ConfigError,
    DistributedError,
    NoBatchFitsError,
    NonFiniteLossError,
    PlanError,
)
from autoaccum.memory.collect import memory_report
from autoaccum.plan import Plan, make_plan
from autoaccum.probing.oom import is_oom
from autoaccum.probing.search import search_max_batch
from autoaccum.probing.trials import probe
from autoaccum.results import FitResult, MemoryReport, ProbeResult, TrialRecord
from autoaccum.train.accumulator import Accumulator
from autoaccum.train.fit import fit
from autoaccum.train.losses import count_tokens

__all__ = [
    "Accumulator",
    "AutoAccumError",
    "BatchError",
    "ConfigError",
    "DistributedError",
    "FitResult",
    "MemoryReport",
    "NoBatchFitsError",
    "NonFiniteLossError",
    "Plan",
    "PlanError",
    "ProbeResult",
    "TrialRecord",
    "__version__",
    "count_tokens",
    "fit",
    "is_oom",
    "make_plan",
    "memory_report",
    "probe",
    "search_max_batch",
]
