"""What the default loss's mean is over, so that micro-batches are weighted exactly.

For ``(inputs, integer targets)`` pairs: the targets that are not ``-100``. For a dict batch
with ``labels`` given to a model that returns its own ``.loss`` (Hugging Face style): the
labels that are not ``-100``, *shifted by one* where the model shifts them (a causal LM
predicts token t+1 from tokens ≤ t, so the first label of every row is never a target).
Whether a model shifts is read off the model itself, once, before the first backward: one
forward without gradients on two samples, whose ``.loss`` is compared with the
cross-entropy of its ``.logits`` over the labels shifted and not shifted. Where neither
matches (a custom loss, label smoothing), the model's class name decides (``…ForCausalLM``,
``…LMHeadModel``: shifted) and one warning says what was assumed and how to pass
``count_fn``. A dict batch without ``labels`` is counted in samples, with a warning too.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from autoaccum.step.batches import batch_size, slice_batch
from autoaccum.step.criterion import check_not_a_criterion, from_criterion
from autoaccum.step.losses import (
    IGNORE_INDEX,
    CountFn,
    LossFn,
    check_loss_and_count,
    default_count,
    default_loss,
)
from autoaccum.step.rng import preserved_rng

__all__ = ["DefaultCount", "resolve_loss"]

#: relative agreement between the model's loss and a recomputed cross-entropy that counts as
#: the same loss (bf16 autocast and fused kernels differ from an fp32 recomputation)
_SAME = 1e-2


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(
        F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
        )
    )


def _name_says_causal(model: nn.Module) -> bool:
    name = type(getattr(model, "module", model)).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel"))


class DefaultCount:
    """The item count behind :func:`~autoaccum.step.losses.default_loss`'s mean.

    :meth:`prepare` reads off the model whether it shifts its labels (call it once with a
    real batch before counting dict batches); counting a dict batch before that assumes the
    model's class name is right.
    """

    def __init__(self) -> None:
        self.shift: bool | None = None  #: whether the model shifts its labels (None: not read)
        self.how = ""  #: how ``shift`` was decided, in words

    def prepare(self, model: nn.Module, batch: Any) -> None:
        """Decide, once, what a dict batch's count is for ``model`` (see the module's doc)."""
        if self.shift is not None:
            return
        if not isinstance(batch, Mapping):
            self.shift, self.how = False, "not a dict batch"
            return
        labels = batch.get("labels")
        if not isinstance(labels, torch.Tensor):
            self.shift, self.how = False, "no labels"
            warnings.warn(
                "the dict batches have no 'labels', so autoaccum weights the model's .loss by "
                "samples; if that loss is a mean over tokens, pass count_fn (e.g. "
                "autoaccum.count_tokens('labels', shift=True)) so micro-batches are weighted "
                "by the items they hold",
                UserWarning,
                stacklevel=4,
            )
            return
        if labels.dim() < 2:  # one label per sample: nothing to shift
            self.shift, self.how = False, "one label per sample"
            return
        self.shift, self.how = self._read_shift(model, batch)

    def _read_shift(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[bool, str]:
        small = slice_batch(batch, 0, min(2, batch_size(batch)))
        with torch.no_grad(), preserved_rng():
            out = model(**small)
        loss = getattr(out, "loss", None)
        logits = getattr(out, "logits", None)
        labels = small["labels"]
        if (
            isinstance(loss, torch.Tensor)
            and isinstance(logits, torch.Tensor)
            and logits.shape[:-1] == labels.shape
        ):
            value = float(loss)
            recomputed = {
                True: _ce(logits[..., :-1, :], labels[..., 1:]),
                False: _ce(logits, labels),
            }
            error = {s: abs(v - value) / max(abs(value), 1e-12) for s, v in recomputed.items()}
            best = min(error, key=lambda s: error[s])
            if error[best] < _SAME and error[not best] > 3 * error[best]:
                return best, "read off the model's loss"
        assumed = _name_says_causal(model)
        inner = type(getattr(model, "module", model)).__name__
        how = "shifted" if assumed else "not shifted"
        warnings.warn(
            f"autoaccum could not tell from {inner}'s .loss whether it averages over labels "
            f"shifted by one (a causal LM) or not, and assumed {how} from the class name: "
            f"micro-batches are weighted by the labels that are not "
            f"-100{', less the first of each row' if assumed else ''}. If the loss is averaged "
            "otherwise, pass count_fn=autoaccum.count_tokens('labels', shift=...) or your own",
            UserWarning,
            stacklevel=5,
        )
        return assumed, "assumed from the class name"

    def __call__(self, batch: Any) -> int | torch.Tensor:
        if isinstance(batch, Mapping) and isinstance(batch.get("labels"), torch.Tensor):
            labels = batch["labels"]
            if labels.dim() >= 2 and (self.shift if self.shift is not None else False):
                labels = labels[..., 1:]
            count: torch.Tensor = (labels != IGNORE_INDEX).sum()
            return count
        return default_count(batch)


def resolve_loss(loss_fn: LossFn | None, count_fn: CountFn | None) -> tuple[LossFn, CountFn]:
    """The loss and count functions to train with: the user's, or the defaults.

    Without ``loss_fn`` the default loss is used and, without ``count_fn``, its own count
    (:class:`DefaultCount`); a loss module (``nn.CrossEntropyLoss()``) is applied to
    ``(inputs, targets)`` batches and counted by what its mean is over
    (:mod:`~autoaccum.step.criterion`); a user's ``loss_fn`` without ``count_fn`` is weighted
    by samples.
    """
    check_loss_and_count(loss_fn, count_fn)
    if isinstance(loss_fn, nn.Module):  # a loss module: criterion(model(inputs), targets)
        criterion_loss, criterion_count = from_criterion(loss_fn)
        return criterion_loss, count_fn if count_fn is not None else criterion_count
    if loss_fn is not None:
        check_not_a_criterion(loss_fn)
    loss = loss_fn if loss_fn is not None else default_loss
    if count_fn is not None:
        return loss, count_fn
    return loss, DefaultCount() if loss_fn is None else batch_size
