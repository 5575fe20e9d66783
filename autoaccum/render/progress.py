"""The training progress bar (rich), a callback of the run. Silent when stdout is not a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["TrainProgress"]


class TrainProgress:
    """Shows optimizer steps of ``total()`` (read at the first step, once the plan is known),
    samples/s, the last window loss and the micro-batches in force. The bar appears at the
    first step, so that what is printed before it (the plan) is not drawn over."""

    def __init__(self, total: Callable[[], int | None], console: Console | None = None) -> None:
        self._total = total
        self._progress: Progress | None = None
        self._task: Any = None
        if sys.stdout.isatty():
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(
                    "{task.fields[rate]} samples/s  loss {task.fields[loss]}  {task.fields[plan]}"
                ),
                TimeElapsedColumn(),
                console=console or Console(),
                transient=False,
            )

    def __enter__(self) -> TrainProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.stop()

    def on_step(self, run: Any) -> None:
        """A callback hook (see :mod:`autoaccum.train.callbacks`): one step done."""
        if self._progress is None:
            return
        state = run.state()
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=self._total(), completed=state.step - 1, rate="-", loss="-", plan=""
            )
        sizes = state.micro_sizes
        split = "+".join(map(str, sizes)) if len(set(sizes)) > 1 else f"{sizes[0]} × {len(sizes)}"
        rate = state.samples_seen / max(state.seconds, 1e-9)
        self._progress.update(
            self._task,
            completed=state.step,
            rate=f"{rate:,.0f}",
            loss=f"{state.loss:.4f}",
            plan=f"micro {split}",
        )
