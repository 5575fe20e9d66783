"""probe(): real training trials, the safety margin, and a probe that leaves no trace."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from helpers import OOMAbove, bn_net
from torch import nn
from torch.nn import functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

import autoaccum
from autoaccum import BatchError, ConfigError, NoBatchFitsError
from autoaccum.memory.peaks import apply_margin


def ce(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def data(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def trained(limit: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = bn_net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ce(model, data(8)).backward()  # optimizer state exists before the probe
    opt.step()
    opt.zero_grad()
    oom_layer(model).limit = limit
    oom_layer(model).sizes.clear()
    return model, opt


def oom_layer(model: nn.Module) -> OOMAbove:
    return next(m for m in model.modules() if isinstance(m, OOMAbove))


def test_state_is_bit_identical_after_a_probe_with_ooms() -> None:
    model, opt = trained(limit=37)
    model.eval()
    model[2].train()  # a mixed mode must come back as it was
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    before_opt = opt.state_dict()
    before_opt_state = {
        k: {n: t.clone() if torch.is_tensor(t) else t for n, t in s.items()}
        for k, s in before_opt["state"].items()
    }
    rng, py_rng = torch.get_rng_state(), random.getstate()

    result = autoaccum.probe(model, data(), loss_fn=ce, optimizer=opt, upper=256)

    assert result.largest_pass == 37
    assert oom_layer(model).sizes  # trials really ran the model
    after = model.state_dict()
    assert before_model.keys() == after.keys()
    for key, value in before_model.items():
        assert torch.equal(value, after[key]), key  # BatchNorm running stats included
    state = opt.state_dict()["state"]
    for idx, saved in before_opt_state.items():
        for name, value in saved.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state[idx][name])), (
                idx,
                name,
            )
    assert opt.state_dict()["param_groups"] == before_opt["param_groups"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert random.getstate() == py_rng
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert model[2].training
    assert not model[1].training


def test_fresh_optimizer_has_no_state_after_probe() -> None:
    torch.manual_seed(0)
    model = bn_net(12)
    opt = torch.optim.AdamW(model.parameters())
    autoaccum.probe(model, data(), loss_fn=ce, optimizer=opt, upper=64)
    assert len(opt.state) == 0


def test_trial_runs_two_micro_steps_and_an_optimizer_step() -> None:
    model, opt = trained(limit=10**9)
    steps: list[int] = []
    original_step = opt.step

    def counting_step(*args: Any, **kwargs: Any) -> Any:
        steps.append(len(oom_layer(model).sizes))
        return original_step(*args, **kwargs)

    opt.step = counting_step  # type: ignore[method-assign]
    oom_layer(model).sizes.clear()
    result = autoaccum.probe(model, data(), loss_fn=ce, optimizer=opt, upper=8)
    # BatchNorm: never below 2. On the CPU (no device memory to search) the smallest size
    # is measured and then the target tried: two forwards each, then a step.
    assert [t.size for t in result.trials] == [2, 8]
    assert oom_layer(model).sizes == [2, 2, 8, 8]
    assert steps == [2, 4]
    assert "the target's micro-batch of 8 was tried first" in result.notes[0]


def test_margin_applies_only_when_memory_bound() -> None:
    model, opt = trained(limit=100)
    bound = autoaccum.probe(model, data(), loss_fn=ce, optimizer=opt, upper=1000)
    assert (bound.largest_pass, bound.max_micro, bound.margin) == (100, 98, 0.02)
    capped = autoaccum.probe(model, data(), loss_fn=ce, optimizer=opt, upper=64)
    assert (capped.largest_pass, capped.max_micro) == (64, 64)


@pytest.mark.parametrize(
    ("largest_pass", "margin", "expected"),
    [
        (16, 0.02, 15),
        (1863, 0.02, 1825),
        (52, 0.02, 50),
        (1, 0.02, 1),
        (100, 0.0, 100),
        (2, 0.3, 1),
    ],
)
def test_apply_margin(largest_pass: int, margin: float, expected: int) -> None:
    assert apply_margin(largest_pass, margin=margin, hit_limit=True) == expected


def test_margin_out_of_range() -> None:
    model, opt = trained(limit=100)
    with pytest.raises(ConfigError, match="margin"):
        autoaccum.probe(model, data(), loss_fn=ce, optimizer=opt, upper=64, margin=0.7)


def test_batchnorm_never_tried_on_one_sample() -> None:
    model, opt = trained(limit=1)
    with pytest.raises(NoBatchFitsError, match=r"smallest micro-batch \(2\)"):
        autoaccum.probe(model, data(), loss_fn=ce, optimizer=opt, upper=64)


def test_batch_is_tiled_from_real_samples() -> None:
    seen: list[torch.Tensor] = []

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        seen.append(batch[0])
        return ce(model, batch)

    model, opt = trained(limit=10**9)
    x, y = data(3)
    autoaccum.probe(model, (x, y), loss_fn=loss, optimizer=opt, upper=7)
    assert torch.equal(seen[-1], torch.cat([x, x, x])[:7])


class Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_bad_inputs_get_clear_errors() -> None:
    model, opt = trained(limit=100)
    frozen = Frozen()
    with pytest.raises(ConfigError, match="no trainable parameters"):
        autoaccum.probe(
            frozen,
            data(),
            loss_fn=ce,
            optimizer=torch.optim.SGD(frozen.parameters(), lr=0.1),
            upper=8,
        )
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="holds none of the model's trainable parameters"):
        autoaccum.probe(model, data(), loss_fn=ce, optimizer=other, upper=8)
    with pytest.raises(BatchError, match="empty"):
        autoaccum.probe(
            model,
            (torch.empty(0, 6), torch.empty(0, dtype=torch.long)),
            loss_fn=ce,
            optimizer=opt,
            upper=8,
        )
    with pytest.raises(ConfigError, match=r"upper \(2\) is smaller than lower \(4\)"):
        autoaccum.probe(model, data(), loss_fn=ce, optimizer=opt, upper=2, lower=4)
    with pytest.raises(ConfigError, match="scalar"):
        autoaccum.probe(
            model,
            data(),
            loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
            optimizer=opt,
            upper=8,
        )


def test_non_oom_error_in_a_trial_restores_state_and_propagates() -> None:
    model, opt = trained(limit=10**9)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        value = ce(model, batch)
        if batch[0].shape[0] >= 8:
            raise ValueError("user bug at 8")
        return value

    with pytest.raises(ValueError, match="user bug"):
        autoaccum.probe(model, data(), loss_fn=loss, optimizer=opt, upper=64)
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value), key


def test_fixed_memory_is_measured_with_optimizer_state() -> None:
    torch.manual_seed(0)
    model = bn_net(100)
    opt = torch.optim.AdamW(model.parameters())
    result = autoaccum.probe(model, data(), loss_fn=ce, optimizer=opt, upper=64)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert result.fixed_bytes["parameters"] == param_bytes
    assert result.fixed_bytes["gradients_expected"] == param_bytes
    # AdamW: two moments per parameter plus a step counter per tensor
    assert result.fixed_bytes["optimizer_state"] >= 2 * param_bytes
    assert len(opt.state) == 0  # and yet the optimizer is back to empty


def test_a_kept_reference_to_the_optimizer_still_steers_it_after_a_probe() -> None:
    """The probe restores the optimizer in place: a param_groups dict or a state tensor the
    user kept is the live one afterwards (load_state_dict would have replaced them)."""
    model, opt = trained(limit=6)
    group = opt.param_groups[0]
    moment = opt.state[next(iter(model.parameters()))]["exp_avg"]
    before = moment.clone()
    autoaccum.probe(model, data(), loss_fn=ce, optimizer=opt, upper=16)
    assert opt.param_groups[0] is group
    assert opt.state[next(iter(model.parameters()))]["exp_avg"] is moment
    assert torch.equal(moment, before)
    group["lr"] = 0.0  # the user's schedule, through the kept reference
    weights = [p.detach().clone() for p in model.parameters()]
    ce(model, data(5)).backward()
    opt.step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


def test_the_users_optimizer_hooks_never_see_a_trial() -> None:
    model, opt = trained(limit=6)
    seen: list[str] = []
    opt.register_step_post_hook(lambda *_: seen.append("own"))
    handle = register_optimizer_step_post_hook(lambda *_: seen.append("all"))
    try:
        autoaccum.probe(model, data(), loss_fn=ce, optimizer=opt, upper=16)
        assert seen == []  # an EMA of the weights would have averaged the trials in
        opt.step()
        assert seen == ["own", "all"]  # and the hooks are back afterwards
    finally:
        handle.remove()


def test_numpy_random_state_is_restored_too() -> None:
    import numpy as np

    class NumpyNoise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            noise = torch.from_numpy(np.random.rand(*x.shape)).float()  # an augmentation
            return self.lin(x + noise)

    model = NumpyNoise()
    np.random.seed(3)
    expected = np.random.rand(4)
    np.random.seed(3)
    autoaccum.probe(model, data(), loss_fn=ce, upper=8)
    assert np.array_equal(np.random.rand(4), expected)


def test_probe_takes_the_defaults_of_fit() -> None:
    """No loss_fn (cross-entropy on (inputs, targets)) and no optimizer (AdamW), as in fit."""
    model = bn_net()
    result = autoaccum.probe(model, data(8), upper=8)
    assert result.largest_pass == 8
    assert result.fixed_bytes["optimizer_state"] > 0  # AdamW's moments existed in the trials


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        (lambda x: x, {}, r"model must be a torch\.nn\.Module"),
        (nn.Linear(6, 3), {"device": "cuda"}, "sees no CUDA device"),
        (nn.Linear(6, 3), {"device": "meta"}, "meta"),
        (nn.Linear(6, 3), {"margin": "0.1"}, "margin must be a number"),
        (nn.Linear(6, 3), {"optimizer": "adam"}, r"optimizer must be a torch\.optim\.Optimizer"),
    ],
)
def test_bad_arguments_are_config_errors(model: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        autoaccum.probe(model, data(), upper=8, **kwargs)


def test_choose_fastest_times_the_candidates_and_says_why() -> None:
    """Where it is asked for (and by default on a GPU), the plan with the most samples/s
    under the ceiling is chosen from timings of the candidate sizes, with the reason."""
    model, opt = trained(limit=100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = autoaccum.probe(model, data(), loss_fn=ce, optimizer=opt, upper=64, choose="fastest")
    assert result.max_micro == 64  # the ceiling stays the ceiling
    assert result.chosen is not None
    plan = autoaccum.make_plan(64, result.chosen, min_micro=2)
    assert result.chosen == plan.micro_batch  # one of the plans' own sizes
    assert result.choice.startswith(f"chose {plan.describe().split(' = ')[1].split(' (')[0]}")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # no trace
    largest = autoaccum.probe(model, data(), loss_fn=ce, optimizer=opt, upper=64)
    # choose="auto" (the default) on the CPU is the largest: nothing picked under the ceiling
    assert (largest.max_micro, largest.chosen, largest.choice) == (64, None, "")
    with pytest.raises(ConfigError, match="choose must be one of"):
        autoaccum.probe(model, data(), loss_fn=ce, optimizer=opt, upper=64, choose="quick")
