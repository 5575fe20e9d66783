"""A PyTorch loss module as loss_fn (``nn.CrossEntropyLoss()``): applied to (inputs, targets)
batches and weighted by what its mean is over, so every step stays exact; what it cannot
weight exactly is a clear error."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import mlp
from reference import LR, TOL, fit_sgd, rel_diff, samples, token_model, tokens, windows_of
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import autoaccum
from autoaccum import ConfigError


def full_window_sgd(
    model: nn.Module, criterion: nn.Module, data: TensorDataset, target: int
) -> None:
    """One step per whole window of ``data``; token targets (n, length) are flattened."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for x, y in windows_of(data, target):
        out = model(x)
        if not y.is_floating_point() and y.dim() > 1:
            out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
        criterion(out, y).backward()
        opt.step()
        opt.zero_grad()


def test_cross_entropy_module_trains_like_the_full_window() -> None:
    data = samples(27)
    model, ref = mlp(), mlp()
    fit_sgd(model, DataLoader(data, batch_size=5), 10, loss_fn=nn.CrossEntropyLoss(), max_micro=4)
    full_window_sgd(ref, nn.CrossEntropyLoss(), data, 10)
    assert rel_diff(model, ref) < TOL


def test_class_weights_and_ignored_tokens_are_weighted_exactly() -> None:
    """CrossEntropyLoss(weight, ignore_index) averages over the targets' summed class weights:
    micro-batches are weighted by that, not by samples or tokens (the negative control)."""
    data = tokens(30)
    weight = torch.linspace(0.5, 2.0, 11, dtype=torch.float64)

    class WeightedTokens(nn.CrossEntropyLoss):
        def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return super().forward(input.reshape(-1, input.shape[-1]), target.reshape(-1))

    criterion = WeightedTokens(weight=weight, ignore_index=-100)
    model, ref, naive = token_model(), token_model(), token_model()
    fit_sgd(model, DataLoader(data, batch_size=4), 12, loss_fn=criterion, max_micro=5)
    full_window_sgd(ref, nn.CrossEntropyLoss(weight=weight, ignore_index=-100), data, 12)
    assert rel_diff(model, ref) < TOL
    tokens_only = autoaccum.count_tokens(shift=False)
    fit_sgd(
        naive,
        DataLoader(data, batch_size=4),
        12,
        loss_fn=criterion,
        count_fn=lambda b: tokens_only({"labels": b[1]}),
        max_micro=5,
    )
    assert rel_diff(naive, ref) > 1e-4  # token counts ignore the class weights


def test_an_elementwise_loss_is_weighted_by_its_elements() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(26, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(26, 3, generator=gen, dtype=torch.float64)
    data = TensorDataset(x, y)
    model, ref = mlp(), mlp()
    fit_sgd(model, DataLoader(data, batch_size=4), 10, loss_fn=nn.MSELoss(), max_micro=4)
    full_window_sgd(ref, nn.MSELoss(), data, 10)
    assert rel_diff(model, ref) < TOL


@pytest.mark.parametrize(
    ("loss_fn", "match"),
    [
        (nn.CrossEntropyLoss(reduction="sum"), "reduction='sum'"),
        (nn.TripletMarginLoss(), "takes other inputs"),
        (F.cross_entropy, "looks like a criterion of \\(input, target\\)"),
    ],
    ids=["sum", "triplet", "function"],
)
def test_what_cannot_be_weighted_exactly_is_a_config_error_before_any_work(
    loss_fn: Any, match: str
) -> None:
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=match):
        fit_sgd(model, DataLoader(samples(8), batch_size=4), 4, loss_fn=loss_fn)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_a_criterion_on_a_dict_batch_says_what_it_is_applied_to() -> None:
    batches = [{"x": torch.randn(4, 5, dtype=torch.float64), "y": torch.zeros(4).long()}]
    with pytest.raises(ConfigError, match="applied as CrossEntropyLoss\\(\\)\\(model\\(inputs"):
        fit_sgd(mlp(), batches, 4, loss_fn=nn.CrossEntropyLoss(), max_micro=4)


def test_the_probe_takes_a_loss_module_too() -> None:
    x, y = samples(8).tensors
    found = autoaccum.probe(mlp(), (x, y), loss_fn=nn.CrossEntropyLoss(), upper=8)
    assert found.largest_pass == 8
