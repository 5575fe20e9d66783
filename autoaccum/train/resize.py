"""Changing the micro-batch during training: smaller after an out-of-memory error, back up
after a run of clean windows, and cutting a window's samples into the new sizes.

A probed size can still run out of memory later: a longer sequence in a padded batch,
fragmentation after hours, another process taking memory. Before the optimizer step
nothing of a window has reached the weights, so the window is run again with smaller
micro-batches: the gradient is count-weighted, hence the step is the same.

The rule (:class:`Resizer`): after an out-of-memory error the ceiling drops by 10 %, or by
as many samples as the failure's memory says are too many (when the failed allocation and
the bytes per sample are known), whichever is more. After ``grow_after`` clean windows in a
row it grows back 10 % toward the ceiling it started from, never to a size that failed
twice. Every change is a :class:`~autoaccum.results.Resize`, warned about.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from autoaccum.errors import BatchError, NoBatchFitsError, PlanError
from autoaccum.memory.peaks import peak_line
from autoaccum.plan import Plan, even_split, make_plan
from autoaccum.results import ProbeResult, Resize
from autoaccum.step.batches import batch_size, concat_batches, map_tensors, split_batch
from autoaccum.step.oom import requested_bytes
from autoaccum.train.data.cut import Window

__all__ = ["GROW_AFTER", "SHRINK", "Resizer", "rechunk", "shrink"]

#: Fraction of the micro-batch given up after an out-of-memory error in training (at least).
SHRINK = 0.1
#: Clean windows in a row after which the micro-batch grows back toward its first ceiling.
GROW_AFTER = 50


def shrink(
    micro_batch: int, *, over_bytes: float | None = None, per_sample: float | None = None
) -> int:
    """The next micro-batch to try after ``micro_batch`` ran out of memory (0: none left).

    At least 10 % smaller; smaller still when the failure was ``over_bytes`` beyond what the
    device could give and each sample costs ``per_sample`` bytes.
    """
    smaller = micro_batch - max(1, math.ceil(SHRINK * micro_batch))
    if over_bytes is not None and per_sample is not None and over_bytes > 0 and per_sample > 0:
        smaller = min(smaller, micro_batch - math.ceil(over_bytes / per_sample))
    return max(0, smaller)


def rechunk(micro_batches: Sequence[Any], plan: Plan) -> list[Any]:
    """The window's samples in micro-batches of ``plan``'s sizes.

    Micro-batches are joined and split per ``plan.window_sizes``; batches that cannot be
    joined (padded to different lengths) are each split into pieces no larger than
    ``plan.micro_batch`` instead. With ``target_tokens`` each micro-batch over the plan's
    budget of padded tokens (packed when the budget was larger: earlier in the epoch, before
    an out-of-memory error) is split into pieces under it.
    """
    if plan.tokens:
        return _under_budget(micro_batches, plan.budget)
    sizes = [batch_size(b) for b in micro_batches]
    if not sizes or max(sizes) <= plan.micro_batch:  # (a rank's share may be empty)
        return list(micro_batches)
    try:
        return split_batch(concat_batches(list(micro_batches)), plan.window_sizes(sum(sizes)))
    except BatchError:
        pieces: list[Any] = []
        for batch, n in zip(micro_batches, sizes, strict=True):
            pieces.extend(split_batch(batch, even_split(n, math.ceil(n / plan.micro_batch))))
        return pieces


def _padded_length(batch: Any) -> int:
    """The length a padded batch's sequences were padded to (its tensors' second dimension)."""
    lengths = [1]

    def note(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 2:
            lengths.append(int(leaf.shape[1]))
        return leaf

    map_tensors(batch, note)
    return max(lengths)


def _under_budget(micro_batches: Sequence[Any], budget: int) -> list[Any]:
    """``micro_batches``, each over ``budget`` padded tokens split into even pieces under it."""
    pieces: list[Any] = []
    for batch in micro_batches:
        n = batch_size(batch)
        most = max(1, budget // _padded_length(batch)) if budget else n
        parts = even_split(n, math.ceil(n / most))
        pieces.extend(split_batch(batch, parts) if n > most else [batch])
    return pieces


class Resizer:
    """The micro-batch's changes during training and the rule that makes them (see the
    module's doc). ``ceiling`` is the size training started from (the probe's or the user's)."""

    def __init__(self, ceiling: int | None = None, *, grow_after: int = GROW_AFTER) -> None:
        self.ceiling = ceiling
        #: the micro-batch ceiling now: the first, less what out-of-memory errors took, plus
        #: what clean windows gave back (windows of a smaller target use less of it)
        self.current = ceiling
        #: what the probe measured: the device's limit and each sample's bytes (None: unknown)
        self.limit_bytes: float | None = None
        self.per_sample: float | None = None
        self.grow_after = grow_after
        self.resizes: list[Resize] = []
        self.oom_retries = 0
        self.failures: Counter[int] = Counter()  #: out-of-memory errors per micro-batch size
        self.clean = 0  #: windows in a row without an out-of-memory error

    def learn(self, found: ProbeResult | None) -> None:
        """Keep what ``found`` measured about memory (for :meth:`reading`)."""
        line = peak_line(found.trials) if found is not None else None
        usable = found is not None and line is not None and line.per_sample > 0
        self.limit_bytes = found.limit_bytes if usable and found is not None else None
        self.per_sample = line.per_sample if usable and line is not None else None

    def reading(self, message: str, device: torch.device) -> dict[str, float]:
        """What an out-of-memory error says about the size to retry with, read while the failed
        micro-step's tensors are still alive: the bytes beyond the device's limit, and each
        sample's bytes (the probe's peak line). Empty where memory is not measured."""
        requested = requested_bytes(message)
        if self.limit_bytes is None or self.per_sample is None or requested is None:
            return {}
        if device.type != "cuda" or not torch.cuda.is_available():
            return {}
        held = torch.cuda.memory_allocated(device)
        return {"over_bytes": held + requested - self.limit_bytes, "per_sample": self.per_sample}

    def after_oom(
        self,
        plan: Plan,
        window: Window,
        step: int,
        where: str,
        *,
        over_bytes: float | None = None,
        per_sample: float | None = None,
    ) -> Plan:
        """The plan to re-run ``window`` with after ``plan`` ran out of memory in it."""
        old = plan.micro_batch
        self.failures[plan.budget if plan.tokens else old] += 1
        self.clean = 0
        smaller = shrink(old, over_bytes=over_bytes, per_sample=per_sample)
        if smaller < plan.min_micro:
            raise NoBatchFitsError(
                f"at {where} training ran out of memory even at micro-batch {old}, the smallest "
                f"this model trains on, after {self.oom_retries} smaller retries. Free memory "
                "held by other tensors or processes, use precision='bf16', activation "
                "checkpointing or a smaller model"
            )
        try:
            new = make_plan(
                plan.target_batch,
                smaller,
                plan.world_size,
                min_micro=plan.min_micro,
                rank=plan.rank,
            )
        except PlanError as err:
            raise NoBatchFitsError(
                f"at {where} training ran out of memory at micro-batch {old}, and no smaller "
                f"exact plan exists: {err}"
            ) from None
        if plan.tokens:  # a budget of padded tokens, as much smaller
            budget = max(1, plan.budget * smaller // old)
            new = dataclasses.replace(new, tokens=plan.tokens, budget=budget)
            said = f"under a budget of {plan.budget:,} padded tokens"
            after = f"under {budget:,} and keeping it (target_tokens {plan.tokens})"
            sizes, self.current = (plan.budget, budget), budget
        else:
            said = f"with micro-batch {old}"
            after = f"with micro-batch {new.micro_batch} and keeping it: {new.describe()}"
            sizes, self.current = (old, new.micro_batch), new.max_micro  # its ceiling
        warnings.warn(
            f"out of memory at {where} {said}; retrying the window (nothing was applied) {after}",
            UserWarning,
            stacklevel=4,
        )
        self._record(step, window, *sizes, "oom")
        self.oom_retries += 1
        return new

    def after_window(self, plan: Plan, window: Window, step: int) -> Plan:
        """The plan for the windows after a clean one: grown back after ``grow_after`` clean
        windows in a row, toward the ceiling, never to a size that failed twice."""
        self.clean += 1
        now, ceiling = self.current, self.ceiling
        if now is None or ceiling is None or self.clean < self.grow_after or now >= ceiling:
            return plan
        self.clean = 0
        target = min(ceiling, now + max(1, math.ceil(SHRINK * now)))
        refused = [size for size, n in self.failures.items() if n >= 2]
        if refused:
            target = min(target, min(refused) - 1)
        if target <= now:
            return plan
        self.current = target  # memory given back, whether this window's share can use it
        if plan.tokens:
            warnings.warn(
                f"{self.grow_after} windows without running out of memory under a budget of "
                f"{now:,} padded tokens: growing it back to {target:,} (target_tokens "
                f"{plan.tokens}; windows are packed under it from the next epoch)",
                UserWarning,
                stacklevel=4,
            )
            self._record(step + 1, window, now, target, "grow")
            return dataclasses.replace(plan, budget=target)
        try:
            new = plan.under(min(target, plan.per_rank))
        except PlanError:
            return plan
        if new.micro_batch <= plan.micro_batch:
            return plan
        warnings.warn(
            f"{self.grow_after} windows without running out of memory at micro-batch "
            f"{plan.micro_batch}: growing back to {new.micro_batch} from optimizer step "
            f"{step + 1}: {new.describe()}",
            UserWarning,
            stacklevel=4,
        )
        self._record(step + 1, window, plan.micro_batch, new.micro_batch, "grow")
        return new

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the changes and the rule's memory, as plain data."""
        return {
            "ceiling": self.ceiling,
            "current": self.current,
            "grow_after": self.grow_after,
            "resizes": [r.to_dict() for r in self.resizes],
            "oom_retries": self.oom_retries,
            "failures": dict(self.failures),
            "clean": self.clean,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a :meth:`state_dict` (its resizes as dicts or :class:`Resize`)."""
        self.ceiling = state["ceiling"]
        self.current = state["current"]
        self.grow_after = state["grow_after"]
        self.resizes = [r if isinstance(r, Resize) else Resize(**r) for r in state["resizes"]]
        self.oom_retries = state["oom_retries"]
        self.failures = Counter(state["failures"])
        self.clean = state["clean"]

    def _record(self, step: int, window: Window, old: int, new: int, reason: str) -> None:
        self.resizes.append(Resize(step, window.epoch, window.index, old, new, reason))
