"""A training run: epochs of windows through the accumulator, callbacks along the way, the
position a checkpoint saves and a resume starts from.

``fit`` builds one and calls :meth:`Run.train`. Between two windows the run is at a window
boundary: nothing of a window is half-applied, so that is where callbacks run, where a
checkpoint is taken and where a stop takes effect. A stop asked on any rank stops every
rank after the same step (the ranks agree on it).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from autoaccum.errors import ConfigError
from autoaccum.plan import Plan
from autoaccum.probing.state import RngState
from autoaccum.results import Resize
from autoaccum.train import checkpoint as ckpt
from autoaccum.train.accumulator import Accumulator
from autoaccum.train.callbacks import StepState
from autoaccum.train.evaluate import evaluate
from autoaccum.train.window import StepOutcome

__all__ = ["Run"]


class Run:
    """One run of ``epochs`` over ``data`` (at most ``max_steps`` optimizer steps in all)."""

    def __init__(
        self,
        acc: Accumulator,
        data: Iterable[Any],
        *,
        epochs: int,
        max_steps: int | None,
        callbacks: Sequence[Any] = (),
    ) -> None:
        self.acc = acc
        self.data = data
        self.epochs = epochs
        self.max_steps = max_steps
        self.callbacks = list(callbacks)
        self.position = ckpt.Position(0, 0, 0, 0, 0.0, 0, 0, ())
        self.metrics: list[dict[str, Any]] = []  #: what callbacks measured (evaluations)
        self.stopped: str | None = None  #: why a callback stopped the run
        self._stop_asked: str | None = None
        self._resumed: dict[str, Any] | None = None  #: this rank's random state to resume from
        self._last: StepOutcome | None = None
        self._window = 0
        self._started = time.perf_counter()

    # ------------------------------------------------------------------ what callbacks see

    @property
    def plan(self) -> Plan:
        assert self.acc.plan is not None  # a run trains a planned accumulator
        return self.acc.plan

    def state(self) -> StepState:
        p = self.position
        return StepState(
            step=p.steps,
            epoch=p.epoch,
            window=self._window,
            loss=p.losses[-1] if p.losses else float("nan"),
            lrs=tuple(float(g["lr"]) for g in self.acc.optimizer.param_groups),
            samples_seen=p.samples,
            tokens_seen=p.items,
            micro_sizes=self.plan.micro_sizes,
            seconds=time.perf_counter() - self._started,
            rank=self.acc.dist.rank,
        )

    def stop(self, reason: str = "a callback asked") -> None:
        """End the run after this step, on every rank."""
        self._stop_asked = reason

    def evaluate(self, data: Iterable[Any], *, max_micro: int | None = None) -> float:
        return evaluate(self.acc, data, max_micro=max_micro)

    def save_checkpoint(self, directory: str | os.PathLike[str], keep: int = 3) -> Path | None:
        """Write a checkpoint of this window boundary (every rank must call it; rank 0 writes
        the file and gets its path)."""
        acc = self.acc
        acc.guard.agree("saving a checkpoint", where="saving a checkpoint")  # all ranks, or none
        source = acc.source(self.data)
        states = acc.agreement.gather(ckpt.random_state(source.epoch_state(self.position.epoch)))
        payload = {
            **ckpt.header(acc.target_batch, acc.dist.world_size, acc.device),
            **ckpt.model_and_optimizer(acc.model, acc.optimizer),
            "scheduler": acc.scheduler.state_dict() if acc.scheduler is not None else None,
            "scaler": acc.scaler.state_dict(),
            "plan": acc.plan,
            "probe": acc.probe_result,
            "resizer": acc.resizer.state_dict(),
            "position": self.position,
            "random": states,
            "metrics": list(self.metrics),
        }
        if acc.dist.rank != 0:
            return None
        return ckpt.save(payload, directory, keep)

    # ------------------------------------------------------------------ resume

    def resume(self, payload: dict[str, Any]) -> bool:
        """Continue from a checkpoint: everything but the plan when the device changed (then
        False: the caller probes again)."""
        acc = self.acc
        ckpt.check_compatible(payload, acc.target_batch, acc.dist.world_size)
        ckpt.load_model_and_optimizer(acc.model, acc.optimizer, payload)
        if acc.scheduler is not None and payload["scheduler"] is not None:
            acc.scheduler.load_state_dict(payload["scheduler"])
        acc.scaler.load_state_dict(payload["scaler"])
        self.position = payload["position"]
        self.metrics = list(payload.get("metrics", []))
        acc.steps = self.position.steps
        self._resumed = payload["random"][acc.dist.rank]
        same_device = bool(payload["device"] == ckpt.device_identity(acc.device))
        if same_device:
            acc.plan, acc.probe_result = payload["plan"], payload["probe"]
            acc.resizer.load_state_dict(payload["resizer"])
        else:
            warnings.warn(
                f"{payload.get('path')} was taken on {payload['device']}, this run is on "
                f"{ckpt.device_identity(acc.device)}: probing the micro-batch again (the plan "
                "changes how windows are split, never which samples they hold)",
                UserWarning,
                stacklevel=3,
            )
        return same_device

    # ------------------------------------------------------------------ the loop

    def _done(self) -> bool:
        at_most = self.max_steps is not None and self.position.steps >= self.max_steps
        return at_most or self.stopped is not None

    def train(self) -> None:
        """The epochs, window by window, from the position (a resumed run's included)."""
        first = self.position.epoch
        for epoch in range(first, self.epochs):
            if self._done():
                break
            skip = self.position.window if epoch == first else 0
            if epoch > first or self._resumed is None:
                self._move(epoch=epoch, window=0, epochs_started=epoch + 1)
            trained, finished = self._epoch(epoch, skip)
            if trained == 0 and skip == 0 and epoch > 0:
                raise ConfigError(
                    f"epoch {epoch} yielded no data: the loader is a one-shot iterator that was "
                    "used up by the previous epoch. Pass a re-iterable (a DataLoader or a list "
                    "of batches) to train for several epochs"
                )
            if finished:  # its last window trained, also when that was the run's last step
                self._call("on_epoch_end")
        self._call("on_train_end")

    def _epoch(self, epoch: int, skip: int) -> tuple[int, bool]:
        """Train ``epoch`` from window ``skip``: (windows trained, whether the epoch's last
        window was trained)."""
        acc = self.acc
        if self._resumed is not None:  # draw the epoch's order again, then continue from now
            acc.source(self.data).restore_epoch(epoch, self._resumed["epoch_draw"])
            now: RngState = self._resumed["now"]
            now.restore()
            self._resumed = None
        trained = 0
        windows = acc.windows(self.data, epoch, skip=skip)
        for window in windows:
            changes = len(acc.resizer.resizes)
            outcome = acc.train_window(window)
            trained += 1
            self._window = window.index
            p = self.position
            self._move(
                window=window.index + 1,
                steps=p.steps + 1,
                samples=p.samples + outcome.samples,
                items=p.items + outcome.items,
                skipped=p.skipped + (not outcome.stepped),
                losses=(*p.losses, outcome.loss),
            )
            for resize in acc.resizer.resizes[changes:]:
                self._call("on_oom", resize)
            self._call("on_step")
            asked = acc.guard.agree(
                "the stop check after a step's callbacks",
                stop=self._stop_asked is not None,
                where="a callback",
            )
            if asked.stop:
                self.stopped = self._stop_asked or "a callback on another rank asked"
            if self._done():
                return trained, self._was_last(window.index)
        return trained, True

    def _was_last(self, index: int) -> bool:
        """Whether window ``index`` was its epoch's last, known without reading the data
        ahead; where the epoch's length is unknown, it was not taken to be."""
        assert self.acc.plan is not None  # a run trains a planned accumulator
        count = self.acc.source(self.data).num_windows(self.acc.plan)
        return count is not None and index + 1 >= count

    def _move(self, **changes: Any) -> None:
        self.position = ckpt.Position(**{**vars(self.position), **changes})

    def _call(self, hook: str, *args: Resize) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if callable(method):
                self.acc.guard.run(partial(method, self, *args), f"a callback's {hook}")
