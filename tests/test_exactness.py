"""Every optimizer step applies exactly the gradient of one big batch of the same samples.

Float64 throughout: plain SGD through ``fit`` must land on the parameters that
full-window SGD gives within 1e-10 (relative), for uneven micro sizes, token-weighted
losses and the short last window; the naive ``loss / accum_iter`` fails the same test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from helpers import OOMAbove, mlp
from reference import (
    LR,
    TOL,
    Batch,
    ce,
    fit_sgd,
    reference,
    rel_diff,
    samples,
    token_ce,
    token_model,
    tokens,
    windows_of,
)
from torch import nn
from torch.utils.data import DataLoader

import autoaccum
from autoaccum.plan import make_plan
from autoaccum.step.batches import split_batch


def naive(
    model: nn.Module,
    windows: Sequence[Batch],
    loss: Callable[[nn.Module, Batch], torch.Tensor],
    max_micro: int,
) -> None:
    """What Lightning and Accelerate do: each micro loss divided by the full accumulation count."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    target = len(windows[0][0])
    accum = make_plan(target, max_micro).accum_iter
    for window in windows:
        sizes = make_plan(target, max_micro).window_sizes(len(window[0]))
        for micro in split_batch(window, sizes):
            (loss(model, micro) / accum).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize(
    ("n", "target", "max_micro"), [(27, 10, 4), (64, 16, 5), (30, 10, 10), (25, 8, 3), (9, 16, 4)]
)
def test_sample_weighted_uneven_and_partial_window(n: int, target: int, max_micro: int) -> None:
    data = samples(n)
    model = mlp()
    result = fit_sgd(model, DataLoader(data, batch_size=7), target, loss_fn=ce, max_micro=max_micro)
    ref = mlp()
    ref_losses = reference(ref, windows_of(data, target), ce)
    assert rel_diff(model, ref) < TOL
    assert result.losses == pytest.approx(ref_losses, rel=1e-12)
    assert result.optimizer_steps == math.ceil(n / target)
    assert result.samples_seen == n


@pytest.mark.parametrize("loader", [True, False])
def test_token_weighted_with_default_loss_and_count(loader: bool) -> None:
    data = tokens(23)
    source: Any = DataLoader(data, batch_size=5) if loader else windows_of(data, 4)
    model = token_model()
    result = fit_sgd(model, source, 10, max_micro=4)  # 4+3+3 sequences, uneven token counts
    ref = token_model()
    ref_losses = reference(ref, windows_of(data, 10), token_ce)
    assert rel_diff(model, ref) < TOL
    assert result.losses == pytest.approx(ref_losses, rel=1e-12)


def test_naive_division_by_accum_iter_fails_the_same_test() -> None:
    """Negative control: uneven token counts and the short last window break ``loss / accum``."""
    data = tokens(23)
    windows = windows_of(data, 10)
    ref, bad = token_model(), token_model()
    reference(ref, windows, token_ce)
    naive(bad, windows, token_ce, max_micro=4)
    assert rel_diff(bad, ref) > 1e-4
    # and the samples case, where only uneven splits and the last window differ
    data = samples(27)
    ref, bad = mlp(), mlp()
    reference(ref, windows_of(data, 10), ce)
    naive(bad, windows_of(data, 10), ce, max_micro=4)
    assert rel_diff(bad, ref) > 1e-4


def test_exact_through_the_probe_with_injected_oom() -> None:
    """The probe finds 6, keeps 5 after the margin, and leaves no trace: still exact."""
    data = samples(40)
    model = mlp(limit=6)
    result = fit_sgd(model, DataLoader(data, batch_size=8), 16, loss_fn=ce)
    assert result.probe is not None
    assert (result.probe.largest_pass, result.probe.max_micro) == (6, 5)
    assert result.plan.micro_sizes == (4, 4, 4, 4)
    ref = mlp()
    reference(ref, windows_of(data, 16), ce)
    assert rel_diff(model, ref) < TOL
    layer = next(m for m in model.modules() if isinstance(m, OOMAbove))
    assert max(layer.sizes[-10:]) <= 5  # training never ran above the plan


def test_several_epochs_and_max_steps() -> None:
    data = samples(25)
    model = mlp()
    sched_steps: list[int] = []
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (sched_steps.append(step), 1.0)[1])
    result = autoaccum.fit(
        model,
        DataLoader(data, batch_size=4),
        10,
        loss_fn=ce,
        optimizer=opt,
        scheduler=sched,
        epochs=3,
        max_micro=3,
        device="cpu",
        progress=False,
        report=False,
    )
    assert result.optimizer_steps == 9 == len(result.losses)  # ceil(25 / 10) per epoch
    assert sched_steps == list(range(10))  # once at construction, then once per optimizer step
    assert result.epochs == 3
    assert result.samples_seen == 75
    ref = mlp()
    reference(ref, windows_of(data, 10) * 3, ce)
    assert rel_diff(model, ref) < TOL
    capped = fit_sgd(
        mlp(), DataLoader(data, batch_size=4), 10, loss_fn=ce, epochs=3, max_steps=4, max_micro=3
    )
    assert capped.optimizer_steps == 4


def test_a_micro_batch_without_target_tokens_adds_nothing_and_stops_nothing() -> None:
    """A prompt-only sample (every label -100) alone in a micro-batch: its mean loss is NaN
    (0/0) and its count 0. It must add exactly nothing, not abort the run."""
    data = tokens(12)
    data.tensors[1][
        1
    ] = -100  # sample 1 has no target token; with max_micro=1 it is a micro-batch alone
    model = token_model()
    result = fit_sgd(model, DataLoader(data, batch_size=4), 4, max_micro=1)
    ref = token_model()
    ref_losses = reference(ref, windows_of(data, 4), token_ce)
    assert rel_diff(model, ref) < TOL
    assert result.losses == pytest.approx(ref_losses, rel=1e-12)
    assert result.samples_seen == 12  # the prompt-only sample is counted as seen


def test_gradients_left_before_fit_do_not_leak_into_the_first_window() -> None:
    """A user's own backward before fit leaves gradients; the first window must not apply them."""
    data = samples(24)
    model = mlp()
    ce(model, (data.tensors[0][:5], data.tensors[1][:5])).backward()  # a stray backward
    fit_sgd(model, DataLoader(data, batch_size=8), 8, loss_fn=ce, max_micro=3)
    ref = mlp()
    reference(ref, windows_of(data, 8), ce)
    assert rel_diff(model, ref) < TOL


def test_two_phase_training_clears_the_frozen_phases_gradients_every_window() -> None:
    """Phase 1 trains only the head (the optimizer holds its parameters alone, the body stays
    trainable); phase 2 everything. Every window starts from zero gradients on every trainable
    parameter, and the parameters the optimizer lacks are named once in a warning."""
    data = samples(24)
    model, ref = mlp(), mlp()
    head = list(model[3].parameters())
    with pytest.warns(UserWarning, match="2 trainable parameter\\(s\\) of Sequential are not in"):
        autoaccum.fit(
            model,
            DataLoader(data, batch_size=8),
            8,
            loss_fn=ce,
            optimizer=torch.optim.SGD(head, lr=LR),
            max_micro=3,
            device="cpu",
            progress=False,
            report=False,
        )
    fit_sgd(model, DataLoader(data, batch_size=8), 8, loss_fn=ce, max_micro=3)
    opt = torch.optim.SGD(ref[3].parameters(), lr=LR)
    for window in windows_of(data, 8):  # phase 1 by hand: only the head moves
        ref.zero_grad()
        ce(ref, window).backward()
        opt.step()
    ref.zero_grad()
    reference(ref, windows_of(data, 8), ce)
    assert rel_diff(model, ref) < TOL
