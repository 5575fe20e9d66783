"""A callback that writes the run to TensorBoard (the ``tensorboard`` extra).

``fit(..., callbacks=[TensorBoard("runs/exp1")])`` and then ``tensorboard --logdir runs``:
the loss, the learning rate(s), the samples and items seen, the plan (as text at the start,
and ``plan/micro_batch`` / ``plan/accum_iter`` as scalars, again at every change), every
micro-batch change and every evaluation, all at their optimizer step.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from autoaccum.errors import ConfigError, MissingExtraError, check_count
from autoaccum.plan import Plan
from autoaccum.results import Resize
from autoaccum.train.callbacks import Callback, RunView

__all__ = ["TensorBoard"]

_WHAT = "autoaccum.TensorBoard"


class TensorBoard(Callback):
    """Writes to TensorBoard in ``log_dir`` (rank 0 only), through torch's ``SummaryWriter``:
    every ``every``-th step's ``train/loss`` (the window's item-weighted loss), ``train/lr``
    (``train/lr/group_N`` with several parameter groups), ``train/samples_seen`` and
    ``train/items_seen``; the plan as the text ``autoaccum/plan`` at the start and the scalars
    ``plan/micro_batch`` and ``plan/accum_iter``, written again at every micro-batch change,
    which is also written as the text ``autoaccum/resize``; and every evaluation's figures as
    ``eval/<name>`` (e.g. ``eval/eval_loss``). Needs the ``tensorboard`` package: a
    :class:`MissingExtraError` naming the pip install when it is absent."""

    def __init__(self, log_dir: str | os.PathLike[str], *, every: int = 1) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise MissingExtraError("tensorboard", "tensorboard", _WHAT)
        self.log_dir = Path(log_dir)
        self.every = check_count("every", every)
        self._writer: Any = None
        self._metrics = 0

    def on_train_start(self, run: RunView) -> None:
        state = run.state()
        if state.rank != 0:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MissingExtraError("tensorboard", "tensorboard", _WHAT) from None
        try:
            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        except OSError as exc:
            raise ConfigError(
                f"TensorBoard cannot write to {self.log_dir}: {exc.strerror or exc}. Give it a "
                "folder this process can create and write to"
            ) from None
        self._writer.add_text("autoaccum/plan", run.plan.describe(), state.step)
        self._plan(run.plan, state.step)
        self._metrics = len(run.metrics)  # a resumed run's earlier ones were written before

    def _plan(self, plan: Plan, step: int) -> None:
        self._writer.add_scalar("plan/micro_batch", plan.micro_batch, step)
        self._writer.add_scalar("plan/accum_iter", plan.accum_iter, step)

    def on_step(self, run: RunView) -> None:
        if self._writer is None:
            return
        state = run.state()
        if state.step % self.every == 0:
            write = self._writer.add_scalar
            write("train/loss", state.loss, state.step)
            for i, lr in enumerate(state.lrs):
                write("train/lr" if len(state.lrs) == 1 else f"train/lr/group_{i}", lr, state.step)
            write("train/samples_seen", state.samples_seen, state.step)
            write("train/items_seen", state.items_seen, state.step)
        self._evaluations(run)

    def on_resize(self, run: RunView, resize: Resize) -> None:
        if self._writer is None:
            return
        self._writer.add_text(
            "autoaccum/resize",
            f"micro-batch {resize.old} → {resize.new} ({resize.reason}) in epoch {resize.epoch}, "
            f"window {resize.window}: {run.plan.describe()}",
            resize.step,
        )
        self._plan(run.plan, resize.step)

    def _evaluations(self, run: RunView) -> None:
        for metric in run.metrics[self._metrics :]:
            step = metric.get("step")
            for name, value in metric.items():
                if name != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"eval/{name}", value, step)
        self._metrics = len(run.metrics)

    def on_epoch_end(self, run: RunView) -> None:
        if self._writer is not None:
            self._writer.flush()

    def on_train_end(self, run: RunView) -> None:
        if self._writer is None:
            return
        self._evaluations(run)  # those the end of training triggered
        self._writer.close()
        self._writer = None
