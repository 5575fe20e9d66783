"""A PyTorch loss module as ``loss_fn``: ``fit(..., loss_fn=nn.CrossEntropyLoss())``.

``loss_fn`` is called as ``loss_fn(model, batch)``; a loss *module* (``criterion(outputs,
targets)``, the PyTorch habit) is taken to mean ``criterion(model(inputs), targets)`` on
``(inputs, targets)`` batches, and weighted by what its mean is over, so the accumulated
step stays exact:

* ``CrossEntropyLoss`` / ``NLLLoss`` with class-index targets: the targets that are not
  ``ignore_index``, each counted by its class ``weight`` where one is given (torch divides
  the weighted sum by the targets' summed weights); with class-probability targets, the
  positions (every element but the class dimension);
* element-wise losses (``MSELoss``, ``L1Loss``, ``BCEWithLogitsLoss``, …): the elements;
* losses whose mean is per sample (``MultiLabelSoftMarginLoss``, ``KLDivLoss('batchmean')``,
  …): the samples.

A loss whose ``reduction`` is not a mean, or one with other inputs (triplets, CTC), is a
:class:`~autoaccum.errors.ConfigError` that says how to write ``loss_fn`` instead.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from autoaccum.errors import ConfigError

__all__ = ["CriterionCount", "CriterionLoss", "check_not_a_criterion", "from_criterion"]

_CLASS_INDEX = (nn.CrossEntropyLoss, nn.NLLLoss)
_PER_ELEMENT = (
    nn.L1Loss,
    nn.MSELoss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.SoftMarginLoss,
    nn.HingeEmbeddingLoss,
    nn.PoissonNLLLoss,
)
_PER_SAMPLE = (nn.MultiMarginLoss, nn.MultiLabelMarginLoss, nn.MultiLabelSoftMarginLoss)

_HOW = (
    "pass loss_fn=lambda model, batch: <the mean loss over the batch's items> (and count_fn: "
    "how many items that mean is over)"
)


def _targets(batch: Any, name: str) -> torch.Tensor:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ConfigError(
            f"loss_fn={name} is applied as {name}(model(inputs), targets) to (inputs, targets) "
            f"batches, but this batch is a {type(batch).__name__}"
            f"{f' of {len(batch)} entries' if isinstance(batch, (tuple, list)) else ''}; {_HOW}"
        )
    targets = batch[1]
    if not isinstance(targets, torch.Tensor):
        raise ConfigError(
            f"loss_fn={name} needs tensor targets, but the batch's targets are a "
            f"{type(targets).__name__}; {_HOW}"
        )
    return targets


class CriterionLoss:
    """``criterion(model(inputs), targets)`` for ``(inputs, targets)`` batches."""

    def __init__(self, criterion: nn.Module) -> None:
        self.criterion = criterion
        self.name = f"{type(criterion).__name__}()"

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        targets = _targets(batch, self.name)
        outputs = model(batch[0])
        logits = getattr(outputs, "logits", outputs)
        if isinstance(self.criterion, _CLASS_INDEX) and not targets.is_floating_point():
            targets = targets.long()  # int32/int16 class indices, as torch wants them
        loss: torch.Tensor = self.criterion(logits, targets)
        return loss


class CriterionCount:
    """The items ``criterion``'s mean is over, for one ``(inputs, targets)`` batch."""

    def __init__(self, criterion: nn.Module) -> None:
        self.criterion = criterion
        self.name = f"{type(criterion).__name__}()"

    def __call__(self, batch: Any) -> int | torch.Tensor:
        targets = _targets(batch, self.name)
        criterion = self.criterion
        if isinstance(criterion, _CLASS_INDEX):
            if targets.is_floating_point():  # class probabilities: (N, C, ...) → N·...
                return targets.numel() // max(1, targets.shape[1] if targets.dim() > 1 else 1)
            kept = targets != criterion.ignore_index
            weight = getattr(criterion, "weight", None)
            if weight is not None:
                classes = targets.clamp(0, weight.numel() - 1).to(weight.device)
                weighted: torch.Tensor = (weight[classes] * kept.to(weight.device)).sum()
                return weighted
            count: torch.Tensor = kept.sum()
            return count
        if isinstance(criterion, _PER_ELEMENT) or (
            isinstance(criterion, nn.KLDivLoss) and criterion.reduction == "mean"
        ):
            return targets.numel()
        return int(targets.shape[0]) if targets.dim() else 1


def from_criterion(criterion: nn.Module) -> tuple[CriterionLoss, CriterionCount]:
    """The loss and count functions for a loss module, or a :class:`ConfigError` saying why
    it cannot be weighted exactly."""
    name = f"{type(criterion).__name__}()"
    reduction = getattr(criterion, "reduction", None)
    known = isinstance(criterion, (*_CLASS_INDEX, *_PER_ELEMENT, *_PER_SAMPLE, nn.KLDivLoss))
    if not known:
        raise ConfigError(
            f"loss_fn={name} takes other inputs than (outputs, targets), or its mean is over "
            f"items autoaccum cannot count; {_HOW}"
        )
    means = ("mean", "batchmean") if isinstance(criterion, nn.KLDivLoss) else ("mean",)
    if reduction not in means:
        raise ConfigError(
            f"loss_fn={name} has reduction={reduction!r}, but autoaccum weights each "
            f"micro-batch's *mean* loss by its items; use reduction='mean' (the default), or "
            f"{_HOW}"
        )
    return CriterionLoss(criterion), CriterionCount(criterion)


_CRITERION_NAMES = (("input", "target"), ("inputs", "targets"), ("outputs", "targets"))


def check_not_a_criterion(loss_fn: object) -> None:
    """A clear error for a plain function of ``(input, target)`` (``F.cross_entropy``) passed
    as ``loss_fn``, which autoaccum calls as ``loss_fn(model, batch)``."""
    try:
        params = list(inspect.signature(loss_fn).parameters)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return
    if tuple(params[:2]) in _CRITERION_NAMES:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise ConfigError(
            f"loss_fn={name} looks like a criterion of ({params[0]}, {params[1]}), but "
            f"autoaccum calls loss_fn(model, batch). Pass a loss module (e.g. "
            f"nn.CrossEntropyLoss()), or loss_fn=lambda model, batch: {name}(model(batch[0]), "
            "batch[1])"
        )
