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
import uuid
import warnings
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from autoaccum.errors import ConfigError, check_count
from autoaccum.plan import Plan
from autoaccum.results import Resize
from autoaccum.step.rng import RngState
from autoaccum.train import checkpoint as ckpt
from autoaccum.train.accumulator import Accumulator
from autoaccum.train.callbacks import StepState, hook_of
from autoaccum.train.checkpoint_codec import encode
from autoaccum.train.checkpoint_files import Folder
from autoaccum.train.checkpoint_random import decode_random, encode_random
from autoaccum.train.data import WindowSource
from autoaccum.train.data.loader import LoaderWindows
from autoaccum.train.evaluate import evaluate
from autoaccum.train.weights import StepOutcome

__all__ = ["Run"]


class Run:
    """One run of ``epochs`` over ``data`` (at most ``max_steps`` optimizer steps in all)."""

    def __init__(
        self,
        acc: Accumulator,
        source: WindowSource,
        *,
        epochs: int,
        max_steps: int | None,
        callbacks: Sequence[Any] = (),
    ) -> None:
        self.acc = acc
        self.source = source  #: the data's windows, built once by fit
        self.epochs = epochs
        self.max_steps = max_steps
        self.callbacks = list(callbacks)
        self.position = ckpt.Position(0, 0, 0, 0, 0.0, 0, 0, ())
        self.metrics: list[dict[str, Any]] = []  #: what callbacks measured (evaluations)
        self.stopped: str | None = None  #: why a callback stopped the run
        self._stop_asked: str | None = None
        self._resumed: dict[str, Any] | None = None  #: this rank's random state to resume from
        self.run_id = uuid.uuid4().hex  #: the run's id, in its checkpoints (rank 0's counts)
        self._continued = False  #: resumed from a checkpoint (its run id kept)
        self._folders: dict[str, Folder] = {}  #: checkpoint folders written to, by path
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
            items_seen=p.items,
            micro_sizes=self.plan.micro_sizes,
            seconds=time.perf_counter() - self._started,
            rank=self.acc.dist.rank,
            target=self.plan.tokens or self.plan.target_batch,
        )

    def stop(self, reason: str = "a callback asked") -> None:
        """End the run after this step, on every rank."""
        self._stop_asked = reason

    def evaluate(self, data: Iterable[Any], *, max_micro: int | None = None) -> float:
        return evaluate(self.acc, data, max_micro=max_micro)

    def save_checkpoint(self, directory: str | os.PathLike[str], keep: int = 3) -> Path | None:
        """Write a checkpoint of this window boundary (every rank must call it; rank 0 writes
        the file and gets its path). ``keep``: this run's newest checkpoints kept in
        ``directory`` (files of other runs are never deleted)."""
        keep = check_count("keep", keep)
        acc = self.acc
        acc.ranks.agree("saving a checkpoint", where="saving a checkpoint")  # all ranks, or none
        if self._resumed is not None:  # resumed, not trained yet: the checkpoint's own state
            now, draw = self._resumed["now"], self._resumed["epoch_draw"]
        else:
            now = RngState.capture()
            draw = self.source.epoch_state(self.position.epoch)
        states = acc.ranks.gather(encode_random(now, draw))
        acc.plan = acc.planner.with_rank_sizes(self.plan, acc.ranks)  # every rank's split now
        state = acc.state_dict(writer=acc.dist.rank == 0)
        if state is None:  # rank 0 writes
            return None
        payload = ckpt.prepare(
            {
                "run_id": self.run_id,
                **state,
                "position": encode(self.position),
                "random": states,
                "metrics": [encode(m) for m in self.metrics],
            }
        )
        folder = self._folder(directory)
        return folder.save(lambda handle: torch.save(payload, handle), self.position.steps, keep)

    def claim_checkpoints(
        self, directory: str | os.PathLike[str], *, overwrite: bool = False
    ) -> None:
        """Check, before the first step, that rank 0 can write checkpoints to ``directory``
        and that it holds no other run's (``overwrite``: they are replaced by this run's
        first checkpoint). A :class:`ConfigError` saying what to do otherwise."""
        if self.acc.dist.rank == 0:
            self._folder(directory).claim(overwrite=overwrite)

    def _folder(self, directory: str | os.PathLike[str]) -> Folder:
        """This run's writer of ``directory`` (it claims the folder at its first save when
        :meth:`claim_checkpoints` did not)."""
        key = str(Path(directory).resolve())
        folder = self._folders.get(key)
        if folder is None or folder.run_id != self.run_id:
            folder = self._folders[key] = Folder(directory, self.run_id)
        return folder

    # ------------------------------------------------------------------ resume

    def resume(self, saved: ckpt.Saved) -> bool:
        """Continue from a checkpoint: everything but the plan when the device changed (then
        False: the caller probes again). Everything is checked against this run first; on a
        mismatch a :class:`ConfigError`, and nothing was loaded."""
        acc, where = self.acc, saved.path or "the checkpoint"
        rank, moved = acc.dist.rank, saved.world_size != acc.dist.world_size
        mine = rank if not moved else 0  # on another world size: the order's (rank 0's)
        try:
            random = decode_random(saved.random[mine], f"random[{mine}]")
            if moved and rank < saved.world_size:  # this rank's own streams, where it had some
                random["now"] = decode_random(saved.random[rank], f"random[{rank}]")["now"]
        except ConfigError as err:
            raise ConfigError(f"{where} is damaged: {err}") from None
        if random["epoch_draw"] is None and isinstance(self.source, LoaderWindows):
            raise ConfigError(
                f"{where} was taken on data without a drawn order (a list of batches or an "
                "iterable), this run reads a DataLoader: nothing was loaded. Resume with the "
                "data it was taken with"
            )
        shared = isinstance(self.source, LoaderWindows) and self.source.global_order
        same_device = acc.load_state_dict(saved, any_world=shared)  # checks it all, then loads
        if moved and acc.dist.is_main:
            warnings.warn(
                f"{where} was taken on {saved.world_size} rank(s), this run has "
                f"{acc.dist.world_size}: the windows and their order carry over exactly, but "
                "each rank's own random streams (dropout, augmentations drawn while training) "
                "cannot be split anew; ranks without a saved stream start from rank 0's",
                UserWarning,
                stacklevel=3,
            )
        self.position = saved.position
        self.metrics = [dict(m) for m in saved.metrics]
        self.run_id = saved.run_id
        self._continued = True
        self._resumed = random
        if not same_device:
            warnings.warn(
                f"{where} was taken on {saved.device}, this run is on "
                f"{ckpt.device_identity(acc.device)}: probing the micro-batch again (the plan "
                "changes how windows are split, never which samples they hold)",
                UserWarning,
                stacklevel=3,
            )
        return same_device

    def _start(self) -> None:
        """Before the first step: the run's id (rank 0's on every rank; a resumed run keeps
        its own), then every callback's ``on_train_start`` (a rank that fails there tells the
        others in the first window's exchange)."""
        if not self._continued:
            self.acc.ranks.agree("starting the run (the settings of every rank)")
            self.run_id = str(self.acc.ranks.gather(self.run_id)[0])
        self._call("on_train_start")

    # ------------------------------------------------------------------ the loop

    def _done(self) -> bool:
        at_most = self.max_steps is not None and self.position.steps >= self.max_steps
        return at_most or self.stopped is not None

    def train(self) -> None:
        """The epochs, window by window, from the position (a resumed run's included)."""
        self._start()
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
            self.source.restore_epoch(epoch, self._resumed["epoch_draw"])
            now: RngState = self._resumed["now"]
            now.restore()
            self._resumed = None
        trained = 0
        first = self.position.steps - skip  # the optimizer step of this epoch's window 0
        windows = acc.windows(self.source, epoch, skip=skip)
        for window in windows:
            changes = len(acc.resizer.resizes)
            outcome = acc.ranks.run(partial(acc.train_window, window), "training a window")
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
                self._call("on_resize", resize)
            self._call("on_step")
            asked = acc.ranks.agree(
                "the stop check after a step's callbacks",
                stop=self._stop_asked is not None,
                where="a callback",
            )
            if asked.stop:
                self.stopped = self._stop_asked or "a callback on another rank asked"
            if self._done():
                count = acc.epoch_windows(self.source, first)  # not reading the data ahead
                return trained, count is not None and window.index + 1 >= count
        return trained, True

    def _move(self, **changes: Any) -> None:
        self.position = ckpt.Position(**{**vars(self.position), **changes})

    def _call(self, hook: str, *args: Resize) -> None:
        for callback in self.callbacks:
            method = hook_of(callback, hook)
            if method is not None:
                self.acc.ranks.run(partial(method, self, *args), f"a callback's {hook}")
