"""autoaccum: memory-aware auto-batching for PyTorch.

Probe the largest micro-batch that fits, plan gradient accumulation so that
micro-batches × accum_iter × ranks equal the target batch exactly, and train with
one accumulating loop whose every optimizer step applies exactly the gradient of
one big batch. Nothing runs at import.

The folders read top down, each importing only those below it: :mod:`autoaccum.train`
(``fit``, the loop, one window end to end, callbacks and checkpoints), :mod:`autoaccum.render`
(the console), :mod:`autoaccum.probing` (the probe), :mod:`autoaccum.memory` (readings, the
peak line, why this plan) and :mod:`autoaccum.step` (what one step is made of: batches,
losses, precision, out-of-memory detection, the ranks' exchange); :mod:`autoaccum.plan`,
:mod:`autoaccum.results` and the other small modules sit at the bottom.
"""

from __future__ import annotations

from autoaccum._version import __version__
from autoaccum.errors import (
    AutoAccumError,
    BatchError,
    ConfigError,
    DistributedError,
    MissingExtraError,
    NoBatchFitsError,
    NonFiniteLossError,
    PlanError,
)
from autoaccum.memory.collect import memory_report
from autoaccum.plan import Plan, make_plan
from autoaccum.probing.search import search_max_batch
from autoaccum.probing.trials import probe
from autoaccum.results import FitResult, MemoryReport, ProbeResult, TrialRecord
from autoaccum.step.losses import count_tokens
from autoaccum.step.oom import is_oom
from autoaccum.train.accumulator import Accumulator
from autoaccum.train.callbacks import Callback, Checkpoint, Evaluate, JsonLog, RunView, StepState
from autoaccum.train.fit import fit
from autoaccum.train.tensorboard import TensorBoard

__all__ = [
    "Accumulator",
    "AutoAccumError",
    "BatchError",
    "Callback",
    "Checkpoint",
    "ConfigError",
    "DistributedError",
    "Evaluate",
    "FitResult",
    "JsonLog",
    "MemoryReport",
    "MissingExtraError",
    "NoBatchFitsError",
    "NonFiniteLossError",
    "Plan",
    "PlanError",
    "ProbeResult",
    "RunView",
    "StepState",
    "TensorBoard",
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
