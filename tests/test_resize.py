"""An out-of-memory error in the middle of training re-runs the window smaller, exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import OOM, OOMAbove, bn_net, mlp
from reference import LR, TOL, ce, fit_sgd, reference, rel_diff, samples, tokens, windows_of
from torch.utils.data import DataLoader, TensorDataset

import autoaccum
from autoaccum import NoBatchFitsError
from autoaccum.plan import Plan, make_plan, packed_plan
from autoaccum.train.data.cut import Window
from autoaccum.train.resize import Resizer, rechunk, shrink


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


def test_an_oom_in_the_optimizer_step_clears_the_windows_gradients() -> None:
    """The failed window's gradients must not stay on the parameters: a second fit on the same
    model would add them to its first window."""

    class OOMOnce(torch.optim.SGD):
        calls = 0

        def step(self, closure: Any = None) -> Any:
            OOMOnce.calls += 1
            if OOMOnce.calls == 2:
                raise OOM("CUDA out of memory (injected in the second optimizer step)")
            return super().step(closure)

    data = samples(16)
    model = mlp()
    with pytest.raises(OOM) as caught:
        autoaccum.fit(
            model,
            DataLoader(data, batch_size=8),
            8,
            loss_fn=ce,
            optimizer=OOMOnce(model.parameters(), lr=LR),
            max_micro=4,
            device="cpu",
            progress=False,
            report=False,
        )
    assert "its gradients were cleared" in "".join(getattr(caught.value, "__notes__", []))
    assert all(p.grad is None for p in model.parameters())
    ref = mlp()
    reference(ref, windows_of(data, 8)[:1], ce)  # the first step was applied, the second not
    assert rel_diff(model, ref) < TOL


def test_nothing_fits_in_training() -> None:
    with (
        pytest.warns(UserWarning, match="out of memory"),
        pytest.raises(NoBatchFitsError, match="even at micro-batch 1"),
    ):
        fit_sgd(mlp(limit=0), DataLoader(samples(8)), 4, loss_fn=ce, max_micro=2)


@pytest.mark.parametrize(("micro", "smaller"), [(100, 90), (8, 7), (2, 1), (1, 0), (1863, 1676)])
def test_shrink(micro: int, smaller: int) -> None:
    assert shrink(micro) == smaller


class OOMInSecondSchedulerStep(torch.optim.lr_scheduler.LambdaLR):
    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.calls = 0
        super().__init__(optimizer, lambda step: 1.0)

    def step(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1
        if self.calls == 3:  # 1: construction, 2: after window 0, 3: after window 1
            raise OOM("CUDA out of memory. Tried to allocate 2.00 MiB (injected in the scheduler)")
        super().step(*args, **kwargs)


def test_an_oom_after_the_optimizer_stepped_is_never_re_run() -> None:
    """The window's update was applied; running it again would apply it twice."""
    data = samples(24)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    steps: list[int] = []
    opt.register_step_post_hook(lambda *_: steps.append(1))
    with pytest.raises(OOM) as info:
        autoaccum.fit(
            model,
            DataLoader(data, batch_size=8),
            8,
            loss_fn=ce,
            optimizer=opt,
            scheduler=OOMInSecondSchedulerStep(opt),
            max_micro=4,
            device="cpu",
            progress=False,
            report=False,
        )
    assert len(steps) == 2  # windows 0 and 1, each once
    assert any("not run again" in note for note in info.value.__notes__)
    ref = mlp()
    reference(ref, windows_of(data, 8)[:2], ce)
    assert rel_diff(model, ref) < TOL


def test_a_retried_window_leaves_no_trace_in_batchnorm() -> None:
    """The forward that ran out of memory had already updated BatchNorm's statistics; the
    re-run window puts them back first, so they count the micro-steps really trained."""
    torch.manual_seed(0)
    model = bn_net(limit=5, dtype=torch.float64)
    oom = next(m for m in model.modules() if isinstance(m, OOMAbove))
    bn = model[1]
    x, y = torch.randn(24, 6, dtype=torch.float64), torch.randint(0, 3, (24,))
    with pytest.warns(UserWarning, match="out of memory"):
        fit_sgd(model, DataLoader(TensorDataset(x, y), batch_size=8), 12, loss_fn=ce, max_micro=6)
    trained = [s for s in oom.sizes if s <= 5]
    assert int(bn.num_batches_tracked) == len(trained)  # the failed forward is not counted


def test_recovery_never_goes_below_two_samples_on_batchnorm() -> None:
    model = bn_net(limit=1, dtype=torch.float64)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    with (
        pytest.warns(UserWarning, match="out of memory"),
        pytest.raises(NoBatchFitsError, match="even at micro-batch 2, the smallest this model"),
    ):
        fit_sgd(model, DataLoader(TensorDataset(x, y)), 4, loss_fn=ce, max_micro=4)
    assert all(s >= 2 for s in next(m for m in model.modules() if isinstance(m, OOMAbove)).sizes)


def test_the_failures_memory_shrinks_further_than_ten_percent() -> None:
    # 3 GiB over the limit at 1 GiB a sample: four samples fewer, not the 10 % rule's one
    assert shrink(40, over_bytes=3.2 * 2**30, per_sample=2**30) == 36
    assert shrink(40, over_bytes=0.5 * 2**30, per_sample=2**30) == 36  # at least 10 %
    assert shrink(40) == 36


def test_the_micro_batch_grows_back_but_never_to_a_size_that_failed_twice() -> None:
    resizer = Resizer(ceiling=16, grow_after=3)
    window = Window(0, 0, (), 0)
    first = make_plan(32, 16)  # 16 × 2
    with pytest.warns(UserWarning, match="out of memory .* micro-batch 16"):
        plan = resizer.after_oom(first, window, 1, "step 1")
    assert plan.micro_batch < 16
    for step in range(2, 4):  # two clean windows: not yet
        assert resizer.after_window(plan, window, step) == plan
    with pytest.warns(UserWarning, match="growing back to 16"):
        plan = resizer.after_window(plan, window, 4)
    assert plan.micro_batch == 16
    with pytest.warns(UserWarning, match="out of memory .* micro-batch 16"):
        plan = resizer.after_oom(plan, window, 5, "step 5")  # 16 has failed twice now
    for step in range(6, 60):
        plan = resizer.after_window(plan, window, step)
    assert plan.micro_batch < 16
    assert [(r.reason, r.old, r.new) for r in resizer.resizes] == [
        ("oom", 16, 11),
        ("grow", 11, 16),
        ("oom", 16, 11),
    ]


def _clean(resizer: Resizer, plan: Plan, window: Window, steps: range) -> Plan:
    """``plan`` after clean windows at ``steps``."""
    for step in steps:
        plan = resizer.after_window(plan, window, step)
    return plan


def test_a_token_budget_shrinks_and_grows_back_but_never_to_one_that_failed_twice() -> None:
    """With target_tokens the resizer's sizes are budgets of padded tokens: as much smaller as
    the micro-batch after running out of memory, back up after clean windows, said in
    padded tokens, never to a budget that failed twice."""
    resizer = Resizer(ceiling=400, grow_after=3)
    resizer.current = 400
    window = Window(0, 0, (), 0)
    first = packed_plan((10, 10), 1000, 400)  # 10 samples of at most 40 tokens a micro-batch
    with pytest.warns(UserWarning, match="under a budget of 400 padded tokens; .* under 360"):
        plan = resizer.after_oom(first, window, 1, "step 1")
    assert (plan.tokens, plan.budget, resizer.current) == (1000, 360, 360)
    for step in range(2, 4):
        assert resizer.after_window(plan, window, step) == plan
    with pytest.warns(UserWarning, match="budget of 360 padded tokens: growing it back to 396"):
        plan = resizer.after_window(plan, window, 4)
    assert plan.budget == 396
    with pytest.warns(UserWarning, match="budget of 396 padded tokens: growing it back to 400"):
        plan = _clean(resizer, plan, window, range(5, 8))
    assert plan.budget == 400
    with pytest.warns(UserWarning, match="under a budget of 400"):
        plan = resizer.after_oom(plan, window, 8, "step 8")  # 400 has failed twice now
    with pytest.warns(UserWarning, match="growing it back to") as grown:
        plan = _clean(resizer, plan, window, range(9, 60))
    assert "growing it back to 399" in str(grown[-1].message)  # below 400, not to it
    assert plan.budget == 399
    assert [(r.reason, r.old, r.new) for r in resizer.resizes][:3] == [
        ("oom", 400, 360),
        ("grow", 360, 396),
        ("grow", 396, 400),
    ]
