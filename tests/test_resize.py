"""An out-of-memory error in the middle of training re-runs the window smaller, exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import OOM, OOMAbove, mlp
from reference import LR, TOL, ce, fit_sgd, reference, rel_diff, samples, tokens, windows_of
from torch.utils.data import DataLoader

import autoaccum
from autoaccum import NoBatchFitsError
from autoaccum.plan import make_plan
from autoaccum.train.resize import rechunk, shrink


def test_oom_in_training_shrinks_the_plan_and_stays_exact() -> None:
    data = samples(40)
    model = mlp(limit=6)
    with pytest.warns(UserWarning, match="out of memory at optimizer step 1 .* micro-batch 8"):
        result = fit_sgd(
            model, DataLoader(data, batch_size=8), 16, loss_fn=ce, max_micro=8, epochs=2
        )
    assert result.oom_retries == 1
    assert result.plan.micro_sizes == (6, 5, 5)  # 8 → 7: 16 = 6+5+5, kept for the rest
    ref = mlp()
    reference(ref, windows_of(data, 16) * 2, ce)
    assert rel_diff(model, ref) < TOL
    layer = next(m for m in model.modules() if isinstance(m, OOMAbove))
    assert layer.sizes.count(8) == 1  # one failed micro-step, never again


def test_padded_micro_batches_that_cannot_be_joined_are_split_each() -> None:
    x, y = tokens(12).tensors
    a = (x[:6, :4], y[:6, :4])  # padded to 4
    b = (x[6:, :6], y[6:, :6])  # padded to 6: cannot be joined with a
    pieces = rechunk([a, b], make_plan(12, 4))
    assert [p[0].shape for p in pieces] == [(3, 4), (3, 4), (3, 6), (3, 6)]
    joinable = rechunk([(x[:6], y[:6]), (x[6:], y[6:])], make_plan(12, 5))
    assert [len(p[0]) for p in joinable] == [4, 4, 4]


def test_oom_during_the_optimizer_step_is_not_retried() -> None:
    class OOMStep(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:
            raise OOM("CUDA out of memory (injected in the optimizer step)")

    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(OOM):
        autoaccum.fit(
            model,
            DataLoader(samples(16), batch_size=8),
            8,
            loss_fn=ce,
            optimizer=OOMStep(model.parameters(), lr=LR),
            max_micro=4,
            device="cpu",
            progress=False,
            report=False,
        )
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_nothing_fits_in_training() -> None:
    with (
        pytest.warns(UserWarning, match="out of memory"),
        pytest.raises(NoBatchFitsError, match="even at micro-batch 1"),
    ):
        fit_sgd(mlp(limit=0), DataLoader(samples(8)), 4, loss_fn=ce, max_micro=2)


@pytest.mark.parametrize(("micro", "smaller"), [(100, 90), (8, 7), (2, 1), (1, 0), (1863, 1676)])
def test_shrink(micro: int, smaller: int) -> None:
    assert shrink(micro) == smaller
