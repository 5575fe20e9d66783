"""Acting along the way: the callbacks a run calls, and the ones a user reaches for.

A callback is any object with some of ``on_train_start(run)`` (once, before the first step),
``on_step(run)`` (after every optimizer step), ``on_epoch_end(run)``, ``on_resize(run,
resize)`` (after the micro-batch changed: shrunk after an out-of-memory error, or grown back;
``on_oom``, its old name, still works for one release, with a warning) and
``on_train_end(run)``; :class:`Callback` is a base class with all of them doing nothing.
``run`` is the run in progress (:class:`RunView`): ``run.state()`` says where it stands,
``run.stop()`` ends it after this step (on every rank), ``run.save_checkpoint(...)`` and
``run.evaluate(...)`` do what the built-ins do. Callbacks run on every rank (a checkpoint or
an evaluation needs every rank); the built-ins write files on rank 0 only.

Built in: :class:`Evaluate` (a second loader every N steps, without gradients, with its own
probed micro-batch), :class:`JsonLog` (a JSON line per step and per event) and
:class:`Checkpoint` (every N steps, atomically, this run's last K kept). Both check before the
first step that they can write where they are told to.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from autoaccum.errors import ConfigError, check_count
from autoaccum.plan import Plan
from autoaccum.results import Resize
from autoaccum.train.data import check_evaluation_data

__all__ = [
    "Callback",
    "Checkpoint",
    "Evaluate",
    "Every",
    "JsonLog",
    "RunView",
    "StepState",
    "hook_of",
]


@dataclass(frozen=True)
class StepState:
    """Where a run stands after an optimizer step (all counts over all ranks)."""

    step: int  #: optimizer steps taken (fp16 steps the GradScaler skipped included)
    epoch: int
    window: int  #: the index, within its epoch, of the window just trained
    loss: float  #: that window's loss (item-weighted over the window, all ranks)
    lrs: tuple[float, ...]  #: each parameter group's learning rate now
    samples_seen: int
    items_seen: float  #: items (``count_fn``) seen: samples, or tokens for token-level losses
    micro_sizes: tuple[int, ...]  #: the plan in force (per rank)
    seconds: float  #: since the run started
    rank: int
    target: int = 0  #: the step's target over all ranks: samples, or loss tokens (target_tokens)

    @property
    def tokens_seen(self) -> float:
        """Deprecated name of :attr:`items_seen` (removed in the next release)."""
        warnings.warn("StepState.tokens_seen is now items_seen", DeprecationWarning, stacklevel=2)
        return self.items_seen


class RunView(Protocol):
    """What callbacks see of the run (:class:`autoaccum.train.run.Run`)."""

    plan: Plan
    metrics: list[dict[str, Any]]
    run_id: str  #: the run's id, the same on every rank and after a resume

    def state(self) -> StepState: ...

    def stop(self, reason: str = "a callback asked") -> None: ...

    def save_checkpoint(self, directory: str | os.PathLike[str], keep: int = 3) -> Path | None: ...

    def claim_checkpoints(
        self, directory: str | os.PathLike[str], *, overwrite: bool = False
    ) -> None: ...

    def evaluate(self, data: Iterable[Any], *, max_micro: int | None = None) -> float: ...


class Callback:
    """A base class whose hooks do nothing; override the ones you need."""

    def on_train_start(self, run: RunView) -> None:
        """Once, before the first step (after the plan is made and a resume is loaded): the
        place to check what must work later, e.g. that a file can be written."""

    def on_step(self, run: RunView) -> None:
        """After every optimizer step (``run.state()`` describes it)."""

    def on_epoch_end(self, run: RunView) -> None:
        """After the last window of an epoch."""

    def on_resize(self, run: RunView, resize: Resize) -> None:
        """After the micro-batch changed: shrunk after running out of memory, or grown back."""

    def on_train_end(self, run: RunView) -> None:
        """Once, after the last step."""


def hook_of(callback: object, hook: str) -> Any:
    """``callback``'s ``hook`` method (None when it has none). ``on_resize`` falls back to
    ``on_oom``, its old name, with a deprecation warning."""
    method = getattr(callback, hook, None)
    if hook == "on_resize":
        own = getattr(type(callback), "on_resize", None)
        old = getattr(callback, "on_oom", None)
        if callable(old) and own in (None, Callback.on_resize):
            warnings.warn(
                f"{type(callback).__name__}.on_oom is now on_resize (it runs when the "
                "micro-batch shrinks and when it grows back); rename it",
                DeprecationWarning,
                stacklevel=2,
            )
            return old
    return method if callable(method) else None


class Every(Callback):
    """Acts every ``every`` steps and once more at the end of training (unless the last
    step just did): subclasses define :meth:`act`."""

    def __init__(self, every: int) -> None:
        self.every = check_count("every", every)
        self._last = -1

    def act(self, run: RunView, step: int) -> None:
        raise NotImplementedError

    def on_step(self, run: RunView) -> None:
        step = run.state().step
        if step % self.every == 0:
            self.act(run, step)
            self._last = step

    def on_train_end(self, run: RunView) -> None:
        step = run.state().step
        if step != self._last:
            self.act(run, step)
            self._last = step


class Evaluate(Every):
    """Every ``every`` steps (and at the end of training), the item-weighted mean loss on
    ``data`` without gradients, with the model in eval mode and a micro-batch of its own
    (``max_micro``, or probed: an evaluation forward holds no activations for backward, so it
    fits a larger batch than training). It goes to ``run.metrics`` as
    ``{"step": …, "eval_loss": …}`` and to the log."""

    def __init__(self, data: Iterable[Any], *, every: int, max_micro: int | None = None) -> None:
        super().__init__(every)
        check_evaluation_data(data)
        self.data = data
        self.max_micro = check_count("max_micro", max_micro) if max_micro is not None else None

    def act(self, run: RunView, step: int) -> None:
        loss = run.evaluate(self.data, max_micro=self.max_micro)
        run.metrics.append({"step": step, "eval_loss": loss})


class JsonLog(Callback):
    """Appends one JSON object per line to ``path`` (rank 0 only): every ``every``-th step's
    state, every micro-batch change and every evaluation. Every line is strict JSON: a NaN
    or infinite number is written as ``null``."""

    def __init__(self, path: str | os.PathLike[str], *, every: int = 1) -> None:
        self.path = Path(path)
        self.every = check_count("every", every)
        self._metrics = 0

    def on_train_start(self, run: RunView) -> None:
        if run.state().rank != 0:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a"):
                pass
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if isinstance(exc, FileExistsError):  # a file where its folder should be
                reason = f"{exc.filename or self.path.parent} exists and is not a folder"
            raise ConfigError(
                f"JsonLog cannot write {self.path}: {reason}. Give it a file path this "
                "process can create and append to"
            ) from None
        self._metrics = len(run.metrics)  # a resumed run's earlier ones were logged before

    def _write(self, run: RunView, record: dict[str, Any]) -> None:
        if run.state().rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(_strict(record), allow_nan=False, default=_plain)
        with self.path.open("a") as handle:
            handle.write(line + "\n")

    def on_step(self, run: RunView) -> None:
        state = run.state()
        if state.step % self.every == 0:
            self._write(run, {"event": "step", **asdict(state)})
        self._evaluations(run)

    def _evaluations(self, run: RunView) -> None:
        for metric in run.metrics[self._metrics :]:
            self._write(run, {"event": "eval", **metric})
        self._metrics = len(run.metrics)

    def on_resize(self, run: RunView, resize: Resize) -> None:
        self._write(run, {"event": "resize", **asdict(resize)})

    def on_train_end(self, run: RunView) -> None:
        self._evaluations(run)  # those the end of training triggered


def _strict(value: Any) -> Any:
    """``value`` with NaN and infinite floats as None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def _plain(value: Any) -> Any:
    """A JSON value for what ``json`` does not know: a one-number tensor or numpy scalar as its
    number, anything else as its text."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _strict(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


class Checkpoint(Every):
    """A checkpoint every ``every`` steps in ``directory`` (and at the end), written
    atomically, this run's last ``keep`` kept; ``fit(..., resume=directory)`` (or
    ``resume="auto"``) continues exactly from the newest.

    A new run refuses, before its first step, a folder that holds another run's checkpoints
    (resume that run instead, or use another folder); ``overwrite=True`` starts a new run
    there anyway, and its first checkpoint replaces those files. Only this run's files are
    ever deleted otherwise."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        every: int,
        keep: int = 3,
        overwrite: bool = False,
    ) -> None:
        super().__init__(every)
        self.directory = Path(directory)
        self.keep = check_count("keep", keep)
        if not isinstance(overwrite, bool):
            raise ConfigError(f"overwrite must be True or False, got {overwrite!r}")
        self.overwrite = overwrite
        self.saved: list[Path] = []  #: the files written (rank 0)

    def on_train_start(self, run: RunView) -> None:
        run.claim_checkpoints(self.directory, overwrite=self.overwrite)

    def act(self, run: RunView, step: int) -> None:
        path = run.save_checkpoint(self.directory, keep=self.keep)
        if path is not None:
            self.saved.append(path)
