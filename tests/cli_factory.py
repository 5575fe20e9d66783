"""Factories for the ``autoaccum probe MODULE:FACTORY`` tests."""

from __future__ import annotations

import torch
from torch import nn

NOT_CALLABLE = 3


def _model_and_batch() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    batch = (torch.randn(4, 8), torch.randint(0, 3, (4,)))
    return model, batch


def make() -> dict[str, object]:
    """The dict form: model and batch; default loss (cross-entropy) and AdamW."""
    model, batch = _model_and_batch()
    return {"model": model, "batch": batch}


def make_tuple() -> tuple[object, ...]:
    """The tuple form, with a loss_fn and an optimizer."""
    model, batch = _model_and_batch()

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.cross_entropy(model(inputs), targets)

    return model, batch, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1)


def bad_return() -> int:
    return 42


def no_model() -> dict[str, object]:
    return {"batch": torch.zeros(2, 8)}


def raises() -> dict[str, object]:
    raise ValueError("no such checkpoint")


def string_optimizer() -> dict[str, object]:
    model, batch = _model_and_batch()
    return {"model": model, "batch": batch, "optimizer": "adam"}


def string_loss() -> dict[str, object]:
    model, batch = _model_and_batch()
    return {"model": model, "batch": batch, "loss_fn": "cross_entropy"}
