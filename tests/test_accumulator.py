"""The accumulating loop (Accumulator): one window, one exact optimizer step; the GradScaler,
clipping, skipped steps, nothing half-applied; the own-loop API used in the wrong order."""

from __future__ import annotations

import datetime
import math
from typing import Any

import pytest
import torch
from helpers import mlp
from torch import nn
from torch.nn import functional as F

from autoaccum import Accumulator, ConfigError, NonFiniteLossError
from autoaccum.step.batches import split_batch
from autoaccum.train.data.cut import Window
from autoaccum.train.weights import StepOutcome
from autoaccum.train.window import TrainWindow

LR = 0.5


def data(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=gen
    )


def ce(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def samples(batch: Any) -> int:
    return int(batch[0].shape[0])


def stepper(
    model: nn.Module, *, scaler: torch.amp.GradScaler | None = None, **kwargs: Any
) -> Accumulator:
    """An accumulator with SGD on the CPU; ``scaler`` replaces its (disabled) GradScaler."""
    kwargs.setdefault("loss_fn", ce)
    kwargs.setdefault("count_fn", samples)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=LR), target_batch=10, **kwargs)
    if scaler is not None:
        acc.scaler = scaler
    return acc


def window_of(acc: Accumulator, micro_batches: list[Any], epoch: int = 0) -> TrainWindow:
    total = sum(len(b[0]) for b in micro_batches)
    return TrainWindow(acc.trainer, Window(epoch, 0, tuple(micro_batches), total))


def run(acc: Accumulator, micro_batches: list[Any]) -> StepOutcome:
    """One window through the own-loop API: backward on every micro-batch, then step."""
    for micro in window_of(acc, micro_batches):
        acc.backward(micro)
    return acc.step()


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def reference_step(model: nn.Module, batch: Any, clip: float | None = None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ce(model, batch).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("scaled", [False, True])
def test_window_equals_full_batch_with_scaler_and_clipping(
    scaled: bool, clip: float | None
) -> None:
    batch = data()
    model, ref = mlp(), mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaled else None
    step = stepper(model, scaler=scaler, max_grad_norm=clip)
    outcome = run(step, split_batch(batch, [4, 3, 3]))
    reference_step(ref, batch, clip)
    assert outcome.stepped
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in model.parameters())


class InfGrad(torch.autograd.Function):
    """Identity whose backward overflows, as an fp16 gradient would."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


def test_skipped_fp16_step_changes_nothing_and_does_not_step_the_scheduler() -> None:
    model = mlp()
    before = snapshot(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    step = stepper(model, scaler=scaler, loss_fn=lambda m, b: InfGrad.apply(ce(m, b)))
    sched_calls: list[int] = []
    step.scheduler = torch.optim.lr_scheduler.LambdaLR(
        step.optimizer, lambda s: (sched_calls.append(s), 1.0)[1]
    )
    outcome = run(step, split_batch(data(), [5, 5]))
    assert not outcome.stepped
    assert math.isfinite(outcome.loss)
    assert unchanged(model, before)
    assert sched_calls == [0]  # construction only
    assert scaler.get_scale() == 2.0**9  # backed off


def test_non_finite_loss_names_the_step_and_applies_nothing() -> None:
    model = mlp()
    before = snapshot(model)
    x, y = data()
    x[5] = float("nan")  # in the second micro-batch
    acc = stepper(model)
    acc.steps = 6
    for micro in TrainWindow(acc.trainer, Window(1, 2, tuple(split_batch((x, y), [4, 3, 3])), 10)):
        acc.backward(micro)
    with pytest.raises(NonFiniteLossError) as info:
        acc.step()
    message = str(info.value)
    assert "optimizer step 7 (epoch 1, window 2)" in message
    assert "micro-batch 2 of 3" in message
    assert "Nothing of this window was applied" in message
    assert unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("loss_fn", "match"),
    [
        (lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), "scalar"),
        (lambda m, b: 1.0, "torch.Tensor"),
        (lambda m, b: F.cross_entropy(m(b[0]), b[1]).detach(), "does not require grad"),
    ],
)
def test_bad_loss_raises_and_applies_nothing(loss_fn: Any, match: str) -> None:
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=match):
        run(stepper(model, loss_fn=loss_fn), split_batch(data(), [5, 5]))
    assert unchanged(model, before)


def test_a_failure_in_the_last_micro_step_leaves_no_gradient() -> None:
    model = mlp()
    before = snapshot(model)
    calls = 0

    def flaky(m: nn.Module, b: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("data error in micro-batch 3")
        return ce(m, b)

    with pytest.raises(RuntimeError, match="micro-batch 3"):
        run(stepper(model, loss_fn=flaky), split_batch(data(), [4, 3, 3]))
    assert unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("count_fn", "match"),
    [
        (lambda b: -1, "≥ 0"),
        (lambda b: "7", "number"),
        (lambda b: torch.ones(2), "one number"),
        (lambda b: 0, "0 items in the whole window"),
        (lambda b: float("inf"), "finite number of items"),
        (lambda b: torch.tensor(float("nan")), "finite number of items"),
        (lambda b: True, "number of items"),
    ],
)
def test_bad_counts(count_fn: Any, match: str) -> None:
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=match):
        run(stepper(model, count_fn=count_fn), split_batch(data(), [5, 5]))
    assert unchanged(model, before)


def test_counts_of_any_numeric_type_weigh_the_same() -> None:
    """int, numpy's integers and floats, 0-d tensors of any dtype: one count, one weight."""
    import numpy as np

    kinds = [
        lambda b: len(b[0]),
        lambda b: np.int64(len(b[0])),
        lambda b: np.float32(len(b[0])),
        lambda b: torch.tensor(len(b[0]), dtype=torch.int32),
    ]
    results = []
    for count in kinds:
        model = mlp()
        run(stepper(model, count_fn=count), split_batch(data(), [4, 3, 3]))
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        assert all(torch.equal(p, q) for p, q in zip(results[0], other, strict=True))


@pytest.mark.parametrize("prefetch", [False, True])
def test_zero_count_micro_batch_contributes_nothing(prefetch: bool) -> None:
    """A micro-batch whose count is 0 (all tokens ignored) must not change the step; with
    prefetching, the micro-batch after it is still its own (not the skipped one's)."""
    batch = data()
    counts = iter([4, 0, 3])
    weighted, ref = mlp(), mlp()
    acc = stepper(weighted, count_fn=lambda b: next(counts), prefetch=prefetch)
    run(acc, split_batch(batch, [4, 3, 3]))
    x, y = batch
    keep = torch.cat([torch.arange(0, 4), torch.arange(7, 10)])
    reference_step(ref, (x[keep], y[keep]))
    for p, q in zip(weighted.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_reduce_lr_on_plateau_steps_on_the_window_loss() -> None:
    model = mlp()
    step = stepper(model)
    step.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        step.optimizer, patience=0, factor=0.5, threshold=10.0
    )
    for _ in range(3):  # a loss that does not fall by 1000% is a plateau: lr halves
        run(step, split_batch(data(), [5, 5]))
    assert step.optimizer.param_groups[0]["lr"] < LR


def test_half_precision_loss_is_weighted_in_fp32() -> None:
    seen: list[torch.dtype] = []
    model = mlp().float()

    def bf16_loss(m: nn.Module, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0].float()), b[1]).to(torch.bfloat16)

    original = torch.Tensor.backward

    def spy(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(self.dtype)
        return original(self, *args, **kwargs)

    step = stepper(model, loss_fn=bf16_loss)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "backward", spy)
        run(step, split_batch(data(), [4, 3, 3]))
    assert seen == [torch.float32] * 3


def test_the_own_loop_api_refuses_a_partial_or_doubled_window() -> None:
    """A step after some micro-batches would mis-weight the gradient; a micro-batch twice or
    out of order would double it: each is an error that applies nothing."""
    model = mlp()
    before = snapshot(model)
    acc = stepper(model)
    micros = list(window_of(acc, split_batch(data(), [4, 3, 3])))
    acc.backward(micros[0])
    with pytest.raises(ConfigError, match="after 1 of 3 micro-batches"):
        acc.step()
    assert unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())  # the window was dropped
    micros = list(window_of(acc, split_batch(data(), [4, 3, 3])))
    acc.backward(micros[0])
    with pytest.raises(ConfigError, match="expected 2"):
        acc.backward(micros[0])
    micros = list(window_of(acc, split_batch(data(), [5, 5])))
    acc.backward(micros[0])
    with pytest.raises(ConfigError, match="still waited for step"):
        list(window_of(acc, split_batch(data(), [5, 5])))
    with pytest.raises(ConfigError, match="not of the open window"):
        acc.backward(next(iter(window_of(stepper(mlp()), split_batch(data(), [5, 5])))))
    assert unchanged(model, before)


def test_step_without_a_window_is_an_error() -> None:
    with pytest.raises(ConfigError, match="step\\(\\) without a window"):
        stepper(mlp()).step()


def test_a_window_iterated_twice_is_an_error_that_applies_nothing() -> None:
    """Iterating a window again after some backward() calls would backpropagate every
    micro-batch twice: the window is dropped with an error; an applied window never trains
    again, through the own loop or train_window."""
    model = mlp()
    before = snapshot(model)
    acc = stepper(model)
    window = window_of(acc, split_batch(data(), [4, 3, 3]))
    for micro in window:
        acc.backward(micro)
    with pytest.raises(ConfigError, match="iterated again after 3 of its micro-batches"):
        iter(window)
    with pytest.raises(ConfigError, match="step\\(\\) without a window"):
        acc.step()
    assert unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())
    window = window_of(acc, split_batch(data(), [4, 3, 3]))
    list(window)  # iterating before any backward() is harmless
    for micro in window:
        acc.backward(micro)
    acc.step()
    after = snapshot(model)
    with pytest.raises(ConfigError, match="already applied by step"):
        list(window)
    acc.replan(2)  # train_window re-cuts it: still the same window
    with pytest.raises(ConfigError, match="already applied by step"):
        acc.train_window(window)
    assert unchanged(model, after)


@pytest.mark.parametrize("timeout", [600, 600.0, datetime.timedelta(minutes=10)])
def test_timeout_is_seconds_as_in_fit_or_a_timedelta(timeout: Any) -> None:
    assert stepper(mlp(), timeout=timeout).ranks.group is None  # accepted on one process


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), "600", True])
def test_a_bad_timeout_is_a_config_error(timeout: Any) -> None:
    with pytest.raises(ConfigError, match="timeout must be a"):
        stepper(mlp(), timeout=timeout)
