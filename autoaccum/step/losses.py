"""The default loss, token counts, and the Protocols for the loss and count users pass."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from autoaccum.errors import ConfigError
from autoaccum.step.batches import batch_size

__all__ = [
    "CountFn",
    "LossFn",
    "TokenCount",
    "check_loss",
    "check_loss_and_count",
    "count_tokens",
    "default_count",
    "default_loss",
    "label_count",
]

IGNORE_INDEX = -100


class LossFn(Protocol):
    """``loss_fn(model, batch)``: the *mean* loss over the items of one micro-batch."""

    def __call__(self, model: nn.Module, batch: Any, /) -> torch.Tensor: ...


class CountFn(Protocol):
    """``count_fn(batch)``: how many items the mean of ``loss_fn`` is over.

    A count function may also have a ``prepare(model, batch)`` method: the accumulator calls
    it once, with the first micro-batch of the first window, before counting, so a count can
    depend on the model (see
    :class:`~autoaccum.step.counting.DefaultCount`)."""

    def __call__(self, batch: Any, /) -> int | torch.Tensor: ...


def _loss_attr(out: Any) -> torch.Tensor | None:
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]  # type: ignore[no-any-return]
    loss = getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def _is_pair(batch: Any) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 2


def _class_targets(batch: Any) -> torch.Tensor | None:
    if not _is_pair(batch):
        return None
    targets = batch[1]
    if isinstance(targets, torch.Tensor) and not targets.is_floating_point():
        return targets
    return None


_NO_DEFAULT = (
    "the default loss_fn understands a model whose output has a `.loss` (Hugging Face style, "
    "batches given as dicts of keyword arguments) and (inputs, integer targets) pairs trained "
    "with cross-entropy; {what}. Pass a loss module (loss_fn=torch.nn.MSELoss(), applied as "
    "loss(model(inputs), targets)) or loss_fn=lambda model, batch: <mean loss over the batch's "
    "items> (and count_fn when items are not samples, e.g. tokens)"
)


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The mean loss of ``batch`` for the common shapes of training data.

    - a dict batch is passed as keyword arguments; the output's ``loss`` is used;
    - an ``(inputs, targets)`` pair with integer targets: cross-entropy of ``model(inputs)``
      (logits ``(..., classes)``, targets ``(...)``; ``-100`` is ignored, as in Hugging Face).
    """
    if isinstance(batch, Mapping):
        try:
            out = model(**batch)
        except TypeError:
            if _accepts(model, batch.keys()):
                raise  # a TypeError inside the model's own code: the user's to see
            inner = getattr(model, "module", model)
            raise ConfigError(
                _NO_DEFAULT.format(
                    what=f"{type(inner).__name__}.forward does not take this dict batch's keys "
                    f"{sorted(map(str, batch.keys()))} as keyword arguments"
                )
            ) from None
        loss = _loss_attr(out)
        if loss is None:
            raise ConfigError(
                _NO_DEFAULT.format(what="the model's output for a dict batch has no loss")
            )
        return loss
    targets = _class_targets(batch)
    if targets is None:
        if _is_pair(batch) and isinstance(batch[1], torch.Tensor):
            what = (
                f"this batch's targets are {batch[1].dtype} (a regression?), not integer class "
                "indices; for a regression pass e.g. loss_fn=torch.nn.MSELoss()"
            )
        else:
            what = f"this batch is a {type(batch).__name__} of another shape"
        raise ConfigError(_NO_DEFAULT.format(what=what))
    out = model(batch[0])
    loss = _loss_attr(out)
    if loss is not None:
        return loss
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != targets.dim() + 1:
        raise ConfigError(
            _NO_DEFAULT.format(
                what=f"the model returned {type(logits).__name__} of shape "
                f"{tuple(getattr(logits, 'shape', ()))} for targets of shape {tuple(targets.shape)}"
            )
        )
    return F.cross_entropy(  # class indices of any integer dtype (int32, int16, …) as int64
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1).long(),
        ignore_index=IGNORE_INDEX,
    )


def _accepts(model: nn.Module, keys: Iterable[Any]) -> bool:
    """Whether the model's forward (inside a DDP wrapper) takes ``keys`` as keyword arguments."""
    inner = getattr(model, "module", model)
    try:
        parameters = inspect.signature(inner.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read: assume it does
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return True
    named = {
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {str(k) for k in keys} <= named


def default_count(batch: Any) -> int | torch.Tensor:
    """Items behind :func:`default_loss`'s mean for ``(inputs, integer targets)`` pairs: the
    targets that are not ``-100``; samples (the size of dim 0) for anything else. For dict
    batches with ``labels``, ``fit`` counts with :class:`~autoaccum.step.counting.DefaultCount`,
    which also knows whether the model shifts its labels."""
    targets = _class_targets(batch)
    if targets is not None:
        return (targets != IGNORE_INDEX).sum()
    return batch_size(batch)


class TokenCount:
    """A ``count_fn`` for token-level losses: the labels of ``batch[key]`` that are not
    ``ignore_index``, less each row's first where ``shift`` (a causal LM). Its fields say
    where a sample's loss tokens are, so a token budget can split a sample between windows."""

    def __init__(self, key: Any = "labels", *, shift: bool = True, ignore_index: int = -100):
        self.key = key
        self.shift = shift
        self.ignore_index = ignore_index

    def __call__(self, batch: Any) -> int | torch.Tensor:
        return label_count(batch[self.key], shift=self.shift, ignore_index=self.ignore_index)

    def __repr__(self) -> str:
        return f"count_tokens({self.key!r}, shift={self.shift}, ignore_index={self.ignore_index})"


def count_tokens(
    key: str = "labels", *, shift: bool = True, ignore_index: int = IGNORE_INDEX
) -> TokenCount:
    """A ``count_fn`` for token-level losses: the number of target tokens in ``batch[key]``.

    ``shift=True`` matches causal language models (Hugging Face shifts labels by one, so
    the first position of every sequence is never a target).
    """
    return TokenCount(key, shift=shift, ignore_index=ignore_index)


def label_count(
    labels: Any, *, shift: bool, ignore_index: int = IGNORE_INDEX
) -> int | torch.Tensor:
    """The labels that are not ``ignore_index`` (less each row's first where ``shift``): of a
    tensor ``(..., length)``, or of ragged rows (a list of 1-d tensors or of lists of ints)."""
    if isinstance(labels, torch.Tensor):
        if shift:
            labels = labels[..., 1:]
        count: torch.Tensor = (labels != ignore_index).sum()
        return count
    start = 1 if shift else 0
    total = 0
    for row in labels:
        values = row.tolist() if isinstance(row, torch.Tensor) else row
        total += sum(1 for v in values[start:] if v != ignore_index)
    return total


def check_loss(loss: object, where: str) -> torch.Tensor:
    """``loss`` if it is a scalar tensor that can be backpropagated, else a clear error."""
    if not isinstance(loss, torch.Tensor):
        raise ConfigError(
            f"loss_fn must return a scalar torch.Tensor, but it returned {type(loss).__name__} "
            f"({where})"
        )
    if loss.numel() != 1:
        raise ConfigError(
            f"loss_fn must return the mean loss over the micro-batch (a scalar), but it returned "
            f"a tensor of shape {tuple(loss.shape)} ({where}); reduce it with .mean()"
        )
    if not loss.requires_grad:
        raise ConfigError(
            f"the loss returned by loss_fn does not require grad ({where}): it was computed "
            "without the model's trainable parameters (under torch.no_grad(), or detached)"
        )
    return loss.reshape(())


def check_loss_and_count(loss_fn: object, count_fn: object) -> None:
    """A clear error when ``loss_fn`` or ``count_fn`` is given but cannot be called."""
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
    if count_fn is not None and not callable(count_fn):
        raise ConfigError(f"count_fn must be callable or None, got {type(count_fn).__name__}")
