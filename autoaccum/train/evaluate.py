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

from autoaccum import distributed as D
from autoaccum.distributed import DistInfo
from autoaccum.errors import check_item_count
from autoaccum.plan import make_plan
from autoaccum.probing.search import search_max_batch
from autoaccum.probing.state import preserved_rng
from autoaccum.train.batches import resize_batch, to_device
from autoaccum.train.data import window_source
from autoaccum.train.guard import Guard
from autoaccum.train.losses import CountFn, LossFn
from autoaccum.train.precision import autocast

__all__ = ["evaluate"]

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
    by every rank; less a 2 % margin when memory was the limit."""
    info = acc.dist
    multi = info.active and info.world_size > 1

    def trial(size: int) -> None:
        micro = to_device(resize_batch(batch, size), acc.device)
        with autocast(acc.precision, acc.device):
            acc.loss_fn(model, micro)

    def agree(failed: bool) -> bool:
        return D.all_reduce_max(float(failed), info) > 0

    found = search_max_batch(
        trial,
        upper,
        device=acc.device,
        agree=agree if multi else None,
        first=None if multi else (lambda: upper),
    )
    size = found.largest_pass - max(1, found.largest_pass // 50) * found.hit_limit
    return int(D.all_reduce_min(float(max(1, size)), info))


@torch.no_grad()
def evaluate(acc: _Evaluates, data: Iterable[Any], *, max_micro: int | None = None) -> float:
    """The item-weighted mean loss of ``data`` over every rank (see the module's doc)."""
    model = acc.forward_model
    modes = [(m, m.training) for m in model.modules()]
    info = acc.dist
    world = info.world_size if info.active else 1
    loss_sum, items = 0.0, 0.0
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
                    count = check_item_count(acc.count_fn(batch), "evaluation")
                    with autocast(acc.precision, acc.device):  # run even without items: FSDP2
                        loss = acc.loss_fn(model, to_device(batch, acc.device))  # gathers
                    if count:  # a micro-batch without items adds nothing (its mean is 0/0)
                        loss_sum += float(loss.double()) * count
                        items += count
    except Exception as exc:
        acc.guard.give_up(exc, "evaluation")
        raise
    finally:
        for module, training in modes:
            module.training = training
    agreed = acc.guard.agree(items=items, loss=loss_sum, where="evaluation")
    return agreed.loss / agreed.items if agreed.items else float("nan")
