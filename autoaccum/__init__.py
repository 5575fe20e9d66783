"""autoaccum: memory-aware auto-batching for PyTorch.

Probe the largest micro-batch that fits, plan gradient accumulation so that
micro-batches × accum_iter × ranks equal the target batch exactly, and train with
one accumulating loop whose every optimizer step applies exactly the gradient of
one big batch. Nothing runs at import, and ``import autoaccum`` imports no torch: each
public name below is imported the first time it is used (``autoaccum.fit``, ``from autoaccum
import fit``), the errors at once.

The folders read top down, each importing only those below it: :mod:`autoaccum.train`
(``fit``, the loop, one window end to end, callbacks and checkpoints), :mod:`autoaccum.render`
(the console), :mod:`autoaccum.probing` (the probe), :mod:`autoaccum.memory` (readings, the
peak line, why this plan) and :mod:`autoaccum.step` (what one step is made of: batches,
losses, precision, out-of-memory detection, the ranks' exchange); :mod:`autoaccum.plan`,
:mod:`autoaccum.results` and the other small modules sit at the bottom.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autoaccum._lazy import attach
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

if TYPE_CHECKING:  # what the names below are, for type checkers and editors
    from autoaccum.memory.collect import memory_report
    from autoaccum.plan import Plan, make_plan
    from autoaccum.probing.search import search_max_batch
    from autoaccum.probing.trials import probe
    from autoaccum.results import FitResult, MemoryReport, ProbeResult, TrialRecord
    from autoaccum.schedule import Ramp
    from autoaccum.step.losses import count_tokens
    from autoaccum.step.oom import is_oom
    from autoaccum.train.accumulator import Accumulator
    from autoaccum.train.callbacks import (
        Callback,
        Checkpoint,
        Evaluate,
        JsonLog,
        RunView,
        StepState,
    )
    from autoaccum.train.fit import fit
    from autoaccum.train.tensorboard import TensorBoard

#: where each name is imported from, the first time it is used (they need torch)
_LAZY = {
    "Accumulator": "autoaccum.train.accumulator",
    "Callback": "autoaccum.train.callbacks",
    "Checkpoint": "autoaccum.train.callbacks",
    "Evaluate": "autoaccum.train.callbacks",
    "FitResult": "autoaccum.results",
    "JsonLog": "autoaccum.train.callbacks",
    "MemoryReport": "autoaccum.results",
    "Plan": "autoaccum.plan",
    "ProbeResult": "autoaccum.results",
    "Ramp": "autoaccum.schedule",
    "RunView": "autoaccum.train.callbacks",
    "StepState": "autoaccum.train.callbacks",
    "TensorBoard": "autoaccum.train.tensorboard",
    "TrialRecord": "autoaccum.results",
    "count_tokens": "autoaccum.step.losses",
    "fit": "autoaccum.train.fit",
    "is_oom": "autoaccum.step.oom",
    "make_plan": "autoaccum.plan",
    "memory_report": "autoaccum.memory.collect",
    "probe": "autoaccum.probing.trials",
    "search_max_batch": "autoaccum.probing.search",
}
if not TYPE_CHECKING:
    __getattr__, __dir__ = attach(__name__, _LAZY)

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
    "Ramp",
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
