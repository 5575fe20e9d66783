"""The training progress bar (rich). Silent when disabled or when stdout is not a terminal."""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["TrainProgress"]


class TrainProgress:
    """Shows optimizer steps, samples/s, the last window loss and the plan (micro × accum)."""

    def __init__(self, *, enabled: bool, total: int | None, plan_text: str) -> None:
        self._enabled = enabled and sys.stdout.isatty()
        self._plan_text = plan_text
        self._start = time.perf_counter()
        self._samples = 0
        self._progress: Progress | None = None
        if self._enabled:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(
                    "{task.fields[rate]} samples/s  loss {task.fields[loss]}  {task.fields[plan]}"
                ),
                TimeElapsedColumn(),
                console=Console(),
                transient=False,
            )
            self._task = self._progress.add_task(
                "train", total=total, rate="-", loss="-", plan=plan_text
            )

    def __enter__(self) -> TrainProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, *, samples: int, loss: float) -> None:
        self._samples += samples
        if self._progress is None:
            return
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        self._progress.update(
            self._task, advance=1, rate=f"{self._samples / elapsed:,.0f}", loss=f"{loss:.4f}"
        )
