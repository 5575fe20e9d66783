"""autoaccum: memory-aware auto-batching for PyTorch.

Probe the largest micro-batch that fits, plan gradient accumulation so that
micro-batches × accum_iter × ranks equal the target batch exactly, and train with
one accumulating loop whose every optimizer step applies exactly the gradient of
one big batch. Nothing runs at import.
"""

from __future__ import annotations

from autoaccum.breakdown import ActivationFit, MemoryBreakdown, breakdown, fit_activation
from autoaccum.errors import (
    AutoAccumError,
    BatchError,
    ConfigError,
    DistributedError,
    NoBatchFitsError,
    NonFiniteLossError,
    PlanError,
)
from autoaccum.fit import fit
from autoaccum.footprint import footprint
from autoaccum.losses import count_tokens, default_count, default_loss
from autoaccum.memory import MemoryReport, memory_report
from autoaccum.oom import free_memory, is_oom
from autoaccum.plan import Plan, make_plan
from autoaccum.probe import DEFAULT_MARGIN, probe
from autoaccum.result import FitResult
from autoaccum.search import ProbeResult, TrialRecord, search_max_batch

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MARGIN",
    "ActivationFit",
    "AutoAccumError",
    "BatchError",
    "ConfigError",
    "DistributedError",
    "FitResult",
    "MemoryBreakdown",
    "MemoryReport",
    "NoBatchFitsError",
    "NonFiniteLossError",
    "Plan",
    "PlanError",
    "ProbeResult",
    "TrialRecord",
    "__version__",
    "breakdown",
    "count_tokens",
    "default_count",
    "default_loss",
    "fit",
    "fit_activation",
    "footprint",
    "free_memory",
    "is_oom",
    "make_plan",
    "memory_report",
    "probe",
    "search_max_batch",
]
