"""Evaluation along the way: the item-weighted mean loss of a second loader, without gradients.

The model runs in eval mode (dropout off, BatchNorm on its running statistics) and is put
back in the mode it was in; no random stream moves (shuffling an evaluation loader draws
from a saved state). The micro-batch is its own: an evaluation forward keeps nothing for
backward, so it fits more than training's; it is probed once, forward-only, on the first
samples (or given as ``max_micro``). On several ranks each rank evaluates its share and the
sums are exchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn

from autoaccum.distributed import DistInfo
from autoaccum.errors import BatchError, check_item_count
from autoaccum.plan import make_plan
from autoaccum.probing.search import search_max_batch
from autoaccum.probing.state import preserved_rng
from autoaccum.train.batches import batch_size, resize_batch, to_device
from autoaccum.train.data import window_source
from autoaccum.train.guard import Guard
from autoaccum.train.losses import CountFn, LossFn
from autoaccum.train.precision import autocast

__all__ = ["check_evaluation_data", "evaluate"]

#: The largest evaluation micro-batch a probe tries (per rank).
EVAL_UPPER = 4096


class _Evaluates(Protocol):
    """What an evaluation reads off the accumulator."""

    dist: DistInfo
    device: torch.device
    precision: str
    loss_fn: LossFn
    count_fn: CountFn
    guard: Guard

    @property
    def forward_model(self) -> nn.Module: ...


def _probe_size(acc: _Evaluates, model: nn.Module, batch: Any, upper: int) -> int:
    """The largest forward-only micro-batch that fits, on ``batch``'s samples tiled, agreed
    by every rank (in the ranks' exchange); less a 2 % margin when memory was the limit."""
    guard = acc.guard

    def trial(size: int) -> None:
        micro = to_device(resize_batch(batch, size), acc.device)
        with autocast(acc.precision, acc.device):
            acc.loss_fn(model, micro)

    def agree(failed: bool) -> bool:
        return guard.agree("evaluating", oom=failed, where="evaluation").oom > 0

    found = search_max_batch(
        trial,
        upper,
        device=acc.device,
        agree=agree if guard.multi else None,
        first=None if guard.multi else (lambda: upper),
    )
    size = found.largest_pass - max(1, found.largest_pass // 50) * found.hit_limit
    return min(guard.agree("evaluating", each=max(1, size), where="evaluation").each)


def check_evaluation_data(data: object) -> None:
    """A clear error, at the start, for evaluation data that is empty where that can be known."""
    dataset = getattr(data, "dataset", None)
    try:
        length = len(dataset if dataset is not None else data)  # type: ignore[arg-type]
    except TypeError:
        return  # an iterable of unknown length: checked when it is read
    if length == 0:
        raise BatchError(
            f"the evaluation data ({type(data).__name__}) is empty: Evaluate needs at least one "
            "sample; pass the evaluation DataLoader or list of batches you meant"
        )


@torch.no_grad()
def evaluate(acc: _Evaluates, data: Iterable[Any], *, max_micro: int | None = None) -> float:
    """The item-weighted mean loss of ``data`` over every rank (see the module's doc)."""
    acc.guard.agree("evaluating", where="evaluation")  # every rank evaluates, or all stop
    model = acc.forward_model
    modes = [(m, m.training) for m in model.modules()]
    info = acc.dist
    world = info.world_size if info.active else 1
    loss_sum, items, samples = 0.0, 0.0, 0
    model.eval()
    try:
        with preserved_rng():
            source = window_source(data, rank=info.rank, world_size=world)
            if max_micro is None:
                known = source.samples_per_epoch()
                upper = min(EVAL_UPPER, known) if known else EVAL_UPPER
                sample = source.sample_batch(min(upper, 64))  # real samples, tiled to each size
                max_micro = _probe_size(acc, model, sample, upper=upper)
            plan = make_plan(max_micro * world, max_micro, world)
            for window in acc.guard.iterate(source.windows(plan, 0), "reading the evaluation data"):
                for batch in window.micro_batches:
                    samples += batch_size(batch)
                    count = check_item_count(acc.count_fn(batch), "evaluation")
                    with autocast(acc.precision, acc.device):  # run even without items: FSDP2
                        loss = acc.loss_fn(model, to_device(batch, acc.device))  # gathers
                    if count:  # a micro-batch without items adds nothing (its mean is 0/0)
                        loss_sum += float(loss.double()) * count
                        items += count
    except BatchError as exc:
        named = BatchError(f"the evaluation data: {exc}")
        acc.guard.give_up(named, "evaluation")
        raise named from None
    except Exception as exc:
        acc.guard.give_up(exc, "evaluation")
        raise
    finally:
        for module, training in modes:
            module.training = training
    agreed = acc.guard.agree(
        "evaluating", items=items, samples=samples, loss=loss_sum, where="evaluation"
    )
    if agreed.samples == 0:
        raise BatchError(
            "the evaluation data yielded no samples on any rank; pass a DataLoader or list of "
            "batches with at least one sample"
        )
    return agreed.loss / agreed.items if agreed.items else float("nan")
