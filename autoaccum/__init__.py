"""autoaccum: memory-aware auto-batching for PyTorch.

Probe the largest micro-batch that fits, plan gradient accumulation so that
micro-batches × accum_iter × ranks equal the target batch exactly, and train with
one accumulating loop whose every optimizer step applies exactly the gradient of
one big batch. Nothing runs at import.
"""

from __future__ import annotations

from autoaccum.errors import (
    AutoAccumError,
    BatchError,
    ConfigError,
    DistributedError,
    NoBatchFitsError,
    NonFiniteLossError,
    PlanError,
)
from autoaccum.oom import free_memory, is_oom
from autoaccum.plan import Plan, make_plan
from autoaccum.search import ProbeResult, TrialRecord, search_max_batch

__version__ = "0.1.0"

__all__ = [
    "AutoAccumError",
    "BatchError",
    "ConfigError",
    "DistributedError",
    "NoBatchFitsError",
    "NonFiniteLossError",
    "Plan",
    "PlanError",
    "ProbeResult",
    "TrialRecord",
    "__version__",
    "free_memory",
    "is_oom",
    "make_plan",
    "search_max_batch",
]
