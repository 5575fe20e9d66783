"""Every optimizer of torch.optim and the common schedulers round-trip through a checkpoint:
k steps, a checkpoint, a resume to N equals N steps straight, bit for bit (CPU, float64)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import mlp
from reference import ce, samples
from torch import nn
from torch.optim import lr_scheduler as sched
from torch.utils.data import DataLoader, Subset

import autoaccum
from autoaccum.train import checkpoint, checkpoint_state
from autoaccum.train.callbacks import Checkpoint

MakeOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
MakeScheduler = Callable[[torch.optim.Optimizer], Any]

OPTIMIZERS: dict[str, MakeOptimizer] = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1),
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "Adam": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.01),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=0.01),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=0.01),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "Adadelta": lambda p: torch.optim.Adadelta(p),
    "ASGD": lambda p: torch.optim.ASGD(p, lr=0.1, t0=1),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=0.01),
}
if hasattr(torch.optim, "Adafactor"):  # torch ≥ 2.5
    OPTIMIZERS["Adafactor"] = lambda p: torch.optim.Adafactor(p, lr=0.01)


def _sequential(optimizer: torch.optim.Optimizer) -> Any:
    warm = sched.LinearLR(optimizer, start_factor=0.5, total_iters=2)
    return sched.SequentialLR(optimizer, [warm, sched.ExponentialLR(optimizer, 0.9)], [2])


SCHEDULERS: dict[str, MakeScheduler] = {
    "StepLR": lambda o: sched.StepLR(o, step_size=1, gamma=0.7),
    "LambdaLR": lambda o: sched.LambdaLR(o, lambda step: 0.8**step),
    "OneCycleLR": lambda o: sched.OneCycleLR(o, max_lr=0.2, total_steps=8),
    "CosineAnnealingLR": lambda o: sched.CosineAnnealingLR(o, T_max=4),
    "ReduceLROnPlateau": lambda o: sched.ReduceLROnPlateau(o, factor=0.5, patience=0),
    "SequentialLR": _sequential,
}


def _train(
    make: MakeOptimizer, schedule: MakeScheduler | None, steps: int, **kwargs: Any
) -> tuple[nn.Module, torch.optim.Optimizer, autoaccum.FitResult]:
    model = mlp()
    optimizer = make(model.parameters())
    result = autoaccum.fit(
        model,
        DataLoader(samples(32), batch_size=8),
        8,
        loss_fn=ce,
        optimizer=optimizer,
        scheduler=schedule(optimizer) if schedule is not None else None,
        epochs=2,
        max_steps=steps,
        max_micro=4,
        device="cpu",
        progress=False,
        report=False,
        **kwargs,
    )
    return model, optimizer, result


def _resumed_equals_straight(
    tmp_path: Path, make: MakeOptimizer, schedule: MakeScheduler | None
) -> None:
    straight, optimizer, expected = _train(
        make, schedule, 4, callbacks=[Checkpoint(tmp_path, every=2, keep=2)]
    )
    resumed, again, result = _train(make, schedule, 4, resume=tmp_path / "step-00000002.pt")
    assert result.losses == expected.losses
    assert all(
        torch.equal(p, q) for p, q in zip(resumed.parameters(), straight.parameters(), strict=True)
    )
    assert again.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_resumes_exactly(tmp_path: Path, name: str) -> None:
    _resumed_equals_straight(tmp_path, OPTIMIZERS[name], None)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_common_schedulers_resume_exactly(tmp_path: Path, name: str) -> None:
    _resumed_equals_straight(tmp_path, OPTIMIZERS["SGD-momentum"], SCHEDULERS[name])


def test_resuming_without_the_optimizer_state_would_not_be_exact(tmp_path: Path) -> None:
    """Negative control: the step-2 weights with a fresh Adam end elsewhere than Adam resumed."""
    make = OPTIMIZERS["Adam"]
    straight, _, _ = _train(make, None, 4, callbacks=[Checkpoint(tmp_path, every=2, keep=2)])
    saved = checkpoint.read(tmp_path / "step-00000002.pt")
    model = mlp()
    model.load_state_dict(saved.model)
    autoaccum.fit(
        model,
        DataLoader(Subset(samples(32), range(16, 32)), batch_size=8),  # the windows after 2
        8,
        loss_fn=ce,
        optimizer=make(model.parameters()),
        max_micro=4,
        device="cpu",
        progress=False,
        report=False,
    )
    assert any(
        not torch.equal(p, q)
        for p, q in zip(model.parameters(), straight.parameters(), strict=True)
    )


def test_lbfgs_state_round_trips_though_fit_cannot_step_it() -> None:
    """LBFGS needs a closure that re-evaluates the loss, which a window of accumulated
    micro-batches has not: fit refuses it up front. Its state (lists of tensors, counters)
    still round-trips through a checkpoint's state."""
    model = mlp()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    x, y = samples(8).tensors

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = ce(model, (x, y))
        loss.backward()
        return loss

    optimizer.step(closure)
    taken = copy.deepcopy(checkpoint_state.take(model, optimizer))  # as a file would hold it
    assert taken is not None
    twin = mlp(seed=5)
    other = torch.optim.LBFGS(twin.parameters(), lr=0.5, max_iter=3)
    saved = checkpoint.OptimizerState(
        taken["optimizer"]["state"], taken["optimizer"]["param_groups"]
    )
    checkpoint_state.check_optimizer(twin, other, saved, taken["optimizer_type"], "here")
    twin.load_state_dict(taken["model"])
    checkpoint_state.load_optimizer(twin, other, saved)
    optimizer.step(closure)

    def twin_closure() -> torch.Tensor:
        other.zero_grad()
        loss = ce(twin, (x, y))
        loss.backward()
        return loss

    other.step(twin_closure)
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True)
    )
    with pytest.raises(autoaccum.ConfigError, match="closure"):
        autoaccum.fit(
            model,
            DataLoader(samples(8), batch_size=8),
            8,
            loss_fn=ce,
            optimizer=optimizer,
            device="cpu",
            progress=False,
            report=False,
        )
