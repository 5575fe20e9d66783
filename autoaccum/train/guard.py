"""Failures in the loop: what one rank's error or out-of-memory error means for every rank.

A :class:`Guard` wraps each piece of the loop that can fail between two exchanges (fetching
a window, counting it, each micro-step, the optimizer update). A rank that fails says so
in its next exchange (:mod:`autoaccum.train.agree`) and raises its own error; every other
rank learns it in the same exchange and raises a :class:`~autoaccum.errors.DistributedError`
naming the rank and what happened there — nobody waits for a rank that has given up.

An out-of-memory error in a micro-step is not a failure but a retry: the window is dropped
on every rank and re-run smaller, where that is safe (a single process, or DDP with
deferred gradient sync, whose micro-steps run no collective). Where it is not (FSDP2, or
the overlapped reduction), every rank stops with a clear error instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import torch

from autoaccum.errors import DistributedError
from autoaccum.probing.oom import free_memory, is_oom, requested_bytes
from autoaccum.probing.peaks import peak_line
from autoaccum.results import ProbeResult
from autoaccum.train.agree import Agreed, Agreement
from autoaccum.train.data.window import Window
from autoaccum.train.window import Micro, TrainWindow

__all__ = ["Guard"]

T = TypeVar("T")


class _Steps(Protocol):
    """What the guard runs micro-steps with (the accumulator)."""

    sync: str
    device: torch.device
    probe_result: ProbeResult | None

    def backward(self, micro: Micro) -> torch.Tensor: ...

    def abort(self) -> None: ...

    def where(self, window: Window) -> str: ...

    def most_steps(self) -> int: ...


def _describe(exc: BaseException, where: str) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}{': ' + text if text else ''} (at {where})"


class Guard:
    """Runs the loop's pieces so that every rank learns of any rank's failure."""

    def __init__(self, agreement: Agreement) -> None:
        self.agreement = agreement
        self.reported = False  #: this rank's failure has been told to the others

    @property
    def multi(self) -> bool:
        return self.agreement.group is not None

    def agree(
        self,
        point: str,
        *,
        failure: BaseException | None = None,
        where: str = "training",
        oom: bool = False,
        **values: Any,
    ) -> Agreed:
        """Exchange this rank's word at ``point``; when any rank failed, every rank raises
        (this one its own ``failure``, the others a :class:`DistributedError` saying what
        happened), and when the ranks were at different points, every rank raises a
        :class:`DistributedError` saying where each was."""
        agreed = self.agreement.exchange(
            "failing" if failure is not None else point,
            oom=oom,
            error=failure is not None,
            **values,
        )
        if agreed.error:
            mine = _describe(failure, where) if failure is not None else None
            reasons = self.agreement.gather(mine)
            self.reported = True
            if failure is not None:
                raise failure
            failed = "; ".join(f"rank {r}: {why}" for r, why in enumerate(reasons) if why)
            raise DistributedError(
                f"another rank stopped the run, so this rank stops too instead of waiting for "
                f"it — {failed}"
            )
        if not agreed.same_point:
            self.reported = True  # every rank raises now: nobody is left waiting to be told
            raise DistributedError(
                f"the ranks are out of step: {agreed.where()}. Every rank must make the same "
                "calls in the same order: call run.save_checkpoint() and run.evaluate() on every "
                "rank, not only on rank 0 (each rank holds its part of the state and of the "
                "data; autoaccum writes files on rank 0 only)"
            )
        return agreed

    def same_settings(self, **settings: object) -> None:
        """Every rank must run with the same ``settings`` (the target, the precision, …): a
        rank whose differ would cut other windows or take other steps, and the ranks would
        part ways mid-run. Otherwise every rank raises a :class:`DistributedError`."""
        self.agree("starting the run (the settings of every rank)")
        if not self.multi:
            return
        every: list[Any] = self.agreement.gather(settings)
        differ = [k for k in settings if len({repr(s[k]) for s in every}) > 1]
        if differ:
            listed = "; ".join(
                f"{k}: " + ", ".join(f"rank {r} {s[k]!r}" for r, s in enumerate(every))
                for k in differ
            )
            self.reported = True
            raise DistributedError(
                f"the ranks were started with different settings ({listed}); every rank must "
                "pass the same target and settings (target_batch is the global batch over all "
                "ranks, not each rank's share)"
            )

    def run(self, fn: Callable[[], T], where: str = "training") -> T:
        """``fn()``; if it raises on this rank, the other ranks are told before it propagates."""
        try:
            return fn()
        except Exception as exc:
            self.give_up(exc, where)
            raise

    def give_up(self, exc: BaseException, where: str = "training") -> None:
        """Tell the other ranks (once) that this rank fails with ``exc``; the caller raises."""
        if self.multi and not self.reported:
            try:
                self.agree("failing", failure=exc, where=where)
            except BaseException as told:
                if told is not exc:
                    raise

    def iterate(self, items: Iterator[T], where: str = "reading the data") -> Iterator[T]:
        """``items``, each ``next()`` guarded like :meth:`run`."""
        while True:
            try:
                item = next(items)
            except StopIteration:
                return
            except Exception as exc:
                self.give_up(exc, where)
                raise
            yield item

    def micro_steps(self, acc: _Steps, window: TrainWindow) -> dict[str, float] | None:
        """Forward and backward of every micro-batch of ``window``, each agreed on by every
        rank. None when all succeeded; after an out-of-memory error anywhere (the window then
        dropped everywhere), what it tells about the size to retry with."""
        where = acc.where(window.data)
        for micro in window:
            failure: BaseException | None = None
            reading: dict[str, float] | None = None
            try:
                acc.backward(micro)
            except Exception as exc:
                if is_oom(exc):
                    reading = _reading(acc, str(exc))
                else:
                    failure = exc
            if not self.multi and failure is not None:
                raise failure
            here = f"{where}, micro-batch {micro.index + 1}"
            agreed = self.agree(
                "a micro-step", failure=failure, where=here, oom=reading is not None
            )
            if agreed.oom:
                return self._dropped(acc, agreed, reading, here)
        for _ in range(acc.most_steps() - len(window)):  # ranks with fewer micro-steps wait
            agreed = self.agree("a micro-step", where=where)
            if agreed.oom:
                return self._dropped(acc, agreed, None, where)
        return None

    def _dropped(
        self, acc: _Steps, agreed: Agreed, reading: dict[str, float] | None, where: str
    ) -> dict[str, float]:
        """Drop the window on this rank after ``agreed.oom`` ranks ran out of memory, where
        re-running it is safe; otherwise stop every rank with a clear error."""
        acc.abort()  # every rank drops the window (the failing one already has)
        if self.multi and acc.sync != "deferred":
            raise DistributedError(
                f"{agreed.oom} rank(s) ran out of memory at {where} with sync='overlap' "
                "(FSDP2, or DDP's overlapped reduction), where the other ranks may be inside a "
                "collective that the failed rank will never join: no rank can safely re-run "
                "the window, so every rank stops. Use DDP with sync='deferred' to recover from "
                "such errors, or a smaller max_micro"
            )
        free_memory(acc.device)  # outside the except block: no frame pins the tensors
        return reading if reading is not None and not self.multi else {}

    def update(self, fn: Callable[[], T], where: str) -> T:
        """The optimizer update ``fn()``, agreed on by every rank afterwards: a rank whose
        update failed (its weights possibly half-updated) stops every rank."""
        failure: BaseException | None = None
        result: T | None = None
        try:
            result = fn()
        except Exception as exc:
            if is_oom(exc):
                exc.add_note(
                    f"autoaccum: this happened in the optimizer update of {where}, after every "
                    "micro-batch of the window; the weights may be partly updated, so the "
                    "window is not run again (its gradients were cleared)"
                )
            failure = exc
        if self.multi:
            self.agree(
                "the optimizer update", failure=failure, where=f"the optimizer update of {where}"
            )
        if failure is not None:
            raise failure
        return result  # type: ignore[return-value]  # set whenever fn() returned


def _reading(acc: _Steps, message: str) -> dict[str, float]:
    """What an out-of-memory error says about the size to retry with, read while the failed
    micro-step's tensors are still alive: the bytes beyond the device's limit, and each
    sample's bytes (the probe's peak line). Empty where memory is not measured."""
    found = acc.probe_result
    requested = requested_bytes(message)
    if found is None or found.limit_bytes is None or requested is None:
        return {}
    if acc.device.type != "cuda" or not torch.cuda.is_available():
        return {}
    line = peak_line(found.trials)
    if line is None or line.per_sample <= 0:
        return {}
    held = torch.cuda.memory_allocated(acc.device)
    return {"over_bytes": held + requested - found.limit_bytes, "per_sample": line.per_sample}
