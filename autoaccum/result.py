"""FitResult: what a run of :func:`autoaccum.fit` did."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from autoaccum.plan import Plan
from autoaccum.search import ProbeResult

if TYPE_CHECKING:
    from autoaccum.memory import MemoryReport

__all__ = ["FitResult"]


@dataclass(frozen=True)
class FitResult:
    """The outcome of :func:`autoaccum.fit`.

    ``losses`` holds the true window loss of every optimizer step: the item-weighted
    mean over all samples (or tokens) of the window, across all ranks.
    """

    plan: Plan
    probe: ProbeResult | None
    optimizer_steps: int
    samples_seen: int  #: samples consumed across all ranks
    losses: tuple[float, ...]
    epochs: int  #: epochs started
    seconds: float
    precision: str  #: the resolved precision: "bf16", "fp16" or "fp32"
    device: str
    skipped_steps: int = 0  #: fp16 steps skipped by the GradScaler (inf/NaN gradients)
    oom_retries: int = 0  #: windows re-run with a smaller micro-batch after running out of memory
    memory: MemoryReport | None = None  #: memory snapshot at the end of training
    footprint: dict[str, int] = field(default_factory=dict)  #: bytes of params/grads/optimizer

    def to_dict(self) -> dict[str, object]:
        return {
            "plan": self.plan.to_dict(),
            "probe": self.probe.to_dict() if self.probe is not None else None,
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
            "oom_retries": self.oom_retries,
            "samples_seen": self.samples_seen,
            "losses": list(self.losses),
            "epochs": self.epochs,
            "seconds": self.seconds,
            "precision": self.precision,
            "device": self.device,
            "memory": self.memory.to_dict() if self.memory is not None else None,
            "footprint": dict(self.footprint),
        }
