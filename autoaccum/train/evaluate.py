"""Evaluation along the way: the item-weighted mean loss of a second loader, without gradients.

The model runs in eval mode (dropout off, BatchNorm on its running statistics) and is put
back in the mode it was in; no random stream moves (shuffling an evaluation loader draws
from a saved state). The micro-batch is its own: an evaluation forward keeps nothing for
backward, so it fits more than training's; each evaluation probes it on the first samples
(or takes ``max_micro``), with the probe training uses, its trials forward passes (the same
margin, the ranks agreeing). On several ranks each rank evaluates its share and the
sums are exchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from autoaccum import distributed as D
from autoaccum.errors import BatchError, check_item_count
from autoaccum.plan import make_plan
from autoaccum.probing.trials import probe
from autoaccum.step.batches import batch_size, to_device
from autoaccum.step.precision import autocast
from autoaccum.step.rng import preserved_rng
from autoaccum.train.accumulator import Accumulator
from autoaccum.train.data import as_source

__all__ = ["evaluate"]

#: The largest evaluation micro-batch a probe tries (per rank).
EVAL_UPPER = 4096


@torch.no_grad()
def evaluate(acc: Accumulator, data: Iterable[Any], *, max_micro: int | None = None) -> float:
    """The item-weighted mean loss of ``data`` over every rank (see the module's doc)."""
    ranks = acc.ranks
    ranks.agree("evaluating", where="evaluation")  # every rank evaluates, or all stop
    model = acc.forward_model
    modes = [(m, m.training) for m in model.modules()]
    world = ranks.size
    loss_sum, items, samples = 0.0, 0.0, 0
    model.eval()
    try:
        with preserved_rng():
            source = as_source(data, ranks)
            if max_micro is None:
                known = source.samples_per_epoch()
                upper = min(EVAL_UPPER, known) if known else EVAL_UPPER
                sample = source.sample_batch(min(upper, 64))  # real samples, tiled to each size
                max_micro = probe(
                    model,
                    sample,
                    loss_fn=acc.loss_fn,
                    upper=upper,
                    precision=acc.precision,
                    margin=acc.margin,
                    device=acc.device,
                    ranks=ranks,
                    forward_only=True,
                ).max_micro
            plan = make_plan(max_micro * world, max_micro, world, rank=ranks.rank)
            forwards, last = 0, None
            for window in ranks.iterate(source.windows(plan, 0), "reading the evaluation data"):
                for batch in window.micro_batches:
                    samples += batch_size(batch)
                    count = check_item_count(acc.count_fn(batch), "evaluation")
                    with autocast(acc.precision, acc.device):  # run even without items: FSDP2
                        loss = acc.loss_fn(model, to_device(batch, acc.device))  # gathers
                    forwards, last = forwards + 1, batch
                    if count:  # a micro-batch without items adds nothing (its mean is 0/0)
                        loss_sum += float(loss.double()) * count
                        items += count
            if D.is_fsdp2(model):  # every forward gathers on every rank: as many on each
                stand_in = last if last is not None else source.sample_batch(1)
                for _ in range((source.num_windows(plan) or forwards) - forwards):
                    with autocast(acc.precision, acc.device):
                        acc.loss_fn(model, to_device(stand_in, acc.device))  # counted nowhere
    except BatchError as exc:
        named = BatchError(f"the evaluation data: {exc}")
        ranks.give_up(named, "evaluation")
        raise named from None
    except Exception as exc:
        ranks.give_up(exc, "evaluation")
        raise
    finally:
        for module, training in modes:
            module.training = training
    agreed = ranks.agree(
        "evaluating", items=items, samples=samples, loss=loss_sum, where="evaluation"
    )
    if agreed.samples == 0:
        raise BatchError(
            "the evaluation data yielded no samples on any rank; pass a DataLoader or list of "
            "batches with at least one sample"
        )
    return agreed.loss / agreed.items if agreed.items else float("nan")
