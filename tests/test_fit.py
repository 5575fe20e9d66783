"""fit(): bad input gets a clear typed error, the defaults, the warnings, the demo."""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from helpers import bn_net, mlp
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import autoaccum
from autoaccum import BatchError, ConfigError, NonFiniteLossError, PlanError


def data(n: int = 20) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(n, 5, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (n,), generator=gen),
    )


def run(model: nn.Module, loader: Any, target: Any = 8, **kwargs: Any) -> autoaccum.FitResult:
    kwargs.setdefault("device", "cpu")
    return autoaccum.fit(model, loader, target, progress=False, report=False, **kwargs)


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("target", [0, -8, 2.5, "256", True])  # None: the default, 256
def test_bad_target_batch(target: Any) -> None:
    model = mlp()
    before = params(model)
    with pytest.raises(ConfigError, match="target_batch"):
        run(model, DataLoader(data()), target)
    assert unchanged(model, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs"),
        ({"max_steps": 0}, "max_steps"),
        ({"max_micro": 0}, "max_micro"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm"),
        ({"loss_fn": "mse"}, "loss_fn must be callable"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"precision": "fp16"}, "needs a CUDA device"),
        ({"margin": 0.9}, "margin"),
        ({"margin": "0.1"}, "margin must be a number"),
        ({"margin": None}, "margin must be a number"),
        ({"timeout": 0}, "timeout"),
        ({"sync": "eager"}, "sync must be one of"),
        ({"device": "meta"}, "'meta' holds no data"),
        ({"device": "cuda"}, "sees no CUDA device"),
        ({"device": "cuda:7"}, "sees no CUDA device"),
        ({"device": "tpu:0"}, "not a torch device|not available"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    model = mlp()
    before = params(model)
    with pytest.raises(ConfigError, match=match):
        run(model, DataLoader(data()), **kwargs)
    assert unchanged(model, before)


def test_lbfgs_is_refused_before_any_work() -> None:
    """LBFGS steps through a closure that re-evaluates the loss; a window cannot."""
    model = mlp()
    before = params(model)
    with pytest.raises(ConfigError, match="LBFGS re-evaluates the loss through a closure"):
        run(model, DataLoader(data()), optimizer=torch.optim.LBFGS(model.parameters()))
    assert unchanged(model, before)


def test_not_a_module() -> None:
    with pytest.raises(ConfigError, match=r"torch\.nn\.Module"):
        autoaccum.fit(lambda x: x, [torch.ones(2)], 2)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "loader", [DataLoader(TensorDataset(torch.empty(0, 5), torch.empty(0))), [], iter([])]
)
def test_empty_loader(loader: Any) -> None:
    with pytest.raises(BatchError, match="no samples"):
        run(mlp(), loader, max_micro=4)


def test_ragged_batches_cannot_be_joined() -> None:
    batches = [
        (torch.randn(3, 5, dtype=torch.float64), torch.zeros(3, 4)),
        (torch.randn(3, 5, dtype=torch.float64), torch.zeros(3, 6)),
    ]
    with pytest.raises(BatchError, match="different shapes"):
        run(mlp(), batches, 4, max_micro=4, loss_fn=lambda m, b: m(b[0]).sum())


def test_one_shot_iterator_for_several_epochs() -> None:
    x, y = data().tensors
    with pytest.raises(ConfigError, match="one-shot iterator"):
        run(mlp(), iter([(x, y)]), 8, epochs=2, max_micro=4)


def test_non_finite_loss_through_fit() -> None:
    x, y = data().tensors
    x = x.clone()
    x[13] = float("inf")
    model = mlp()
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 2 \(epoch 0, window 1\)"):
        run(
            model,
            DataLoader(TensorDataset(x, y), batch_size=4),
            8,
            max_micro=3,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        )


class CountingReads(TensorDataset):
    """A dataset that records every sample read."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        super().__init__(*tensors)
        self.reads: list[int] = []

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        self.reads.append(index)
        return super().__getitem__(index)


def test_an_impossible_plan_is_a_plan_error_before_any_work() -> None:
    """5 samples at most 2 at a time would need a 1-sample micro-batch, which a BatchNorm
    model cannot train on: refused before a sample is read or a weight touched."""
    model = bn_net(dtype=torch.float64)
    before = params(model)
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    dataset = CountingReads(x, y)
    with pytest.raises(PlanError, match="target_batch=4 or 6"):
        run(model, DataLoader(dataset, batch_size=4), 5, max_micro=2)
    assert dataset.reads == []
    assert unchanged(model, before)


def test_default_loss_for_pairs_and_default_optimizer() -> None:
    result = run(mlp(), DataLoader(data(), batch_size=5), 8, max_micro=3)
    assert result.optimizer_steps == 3
    assert all(torch.isfinite(torch.tensor(result.losses)))


@dataclass
class Output:
    loss: torch.Tensor
    logits: torch.Tensor


class HFStyle(nn.Module):
    """Takes keyword arguments and returns an output with ``.loss``, like Transformers."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3).double()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        logits = self.lin(input_ids)
        loss = F.cross_entropy(logits, labels) if labels is not None else torch.zeros(())
        return Output(loss=loss, logits=logits)


def test_default_loss_for_hugging_face_style_outputs() -> None:
    x, y = data().tensors
    batches = [{"input_ids": x[i : i + 4], "labels": y[i : i + 4]} for i in range(0, 20, 4)]
    model = HFStyle()
    ref = HFStyle()
    ref.load_state_dict(model.state_dict())
    result = run(
        model, batches, 10, max_micro=3, optimizer=torch.optim.SGD(model.parameters(), lr=0.5)
    )
    assert result.plan.micro_sizes == (3, 3, 2, 2)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for i in (0, 10):
        ref(x[i : i + 10], y[i : i + 10]).loss.backward()
        opt.step()
        opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_default_loss_asks_for_loss_fn_otherwise() -> None:
    triples = [(torch.randn(4, 5, dtype=torch.float64), torch.zeros(4), torch.zeros(4))]
    with pytest.raises(ConfigError, match="Pass a loss module"):
        run(mlp(), triples, 4, max_micro=4)
    # a dict batch for a model that is not Hugging Face-style: not a TypeError from forward()
    dicts = [{"x": torch.randn(4, 5, dtype=torch.float64), "y": torch.zeros(4, dtype=torch.long)}]
    with pytest.raises(ConfigError, match=r"Sequential\.forward does not take .*\['x', 'y'\]"):
        run(mlp(), dicts, 4, max_micro=4)


def test_a_meta_device_leaves_the_weights_where_they_were() -> None:
    model = mlp()
    before = params(model)
    with pytest.raises(ConfigError, match="meta"):
        run(model, DataLoader(data()), device="meta")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert unchanged(model, before)


def test_a_model_already_on_meta_is_a_config_error_not_torchs() -> None:
    with torch.device("meta"):
        model = nn.Linear(5, 3)
    with pytest.raises(ConfigError, match="'meta' device, which hold no data: materialise"):
        run(model, DataLoader(data()), max_micro=4)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int8])
def test_the_default_loss_takes_class_labels_of_any_integer_dtype(dtype: torch.dtype) -> None:
    x, y = data().tensors
    wide, narrow = mlp(), mlp()
    run(wide, DataLoader(TensorDataset(x, y), batch_size=4), 8, max_micro=3)
    run(narrow, DataLoader(TensorDataset(x, y.to(dtype)), batch_size=4), 8, max_micro=3)
    assert all(
        torch.equal(p, q) for p, q in zip(wide.parameters(), narrow.parameters(), strict=True)
    )


def test_float_targets_without_loss_fn_say_what_the_default_loss_expects() -> None:
    x = data().tensors[0]
    with pytest.raises(ConfigError, match=r"targets are torch.float32 \(a regression\?\)"):
        run(mlp(), DataLoader(TensorDataset(x, torch.randn(20, 3)), batch_size=4), max_micro=4)


def test_a_target_larger_than_the_data_warns_once_and_probes_no_larger_than_the_data() -> None:
    with pytest.warns(UserWarning, match="target_batch 64 is larger than the whole epoch") as got:
        result = run(mlp(), DataLoader(data(20), batch_size=4), 64, epochs=3)
    assert sum("larger than the whole epoch" in str(w.message) for w in got) == 1
    assert result.probe is not None
    assert max(t.size for t in result.probe.trials) == 20  # not tiled up to 64
    assert result.optimizer_steps == 3
    assert result.samples_seen == 60


def test_a_model_without_parameters_is_a_config_error_not_torchs() -> None:
    with pytest.raises(ConfigError, match="no trainable parameters"):
        run(nn.ReLU(), DataLoader(data()))


class ModeRecorder(nn.Module):
    """Records whether the model is in training mode at each training forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.dropout = nn.Dropout(0.5)
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.modes.append(self.training)
        return self.net(self.dropout(x))


def test_a_model_in_eval_mode_trains_in_train_mode_and_comes_back_in_eval_mode() -> None:
    model = ModeRecorder()
    model.eval()
    run(model, DataLoader(data(), batch_size=5), 8, max_micro=4)
    assert model.modes
    assert all(model.modes)  # dropout and BatchNorm train as they should
    assert not model.training
    assert not any(m.training for m in model.modules())
    model.train()
    run(model, DataLoader(data(), batch_size=5), 8, max_micro=4)
    assert model.training


def test_a_one_sample_tail_on_a_batchnorm_model_is_dropped_and_counted() -> None:
    """65 samples, target 32: the last window holds one sample, which BatchNorm cannot train
    on. It is left out with a warning that counts it, instead of torch's ValueError after a
    whole epoch of work."""
    x, y = torch.randn(65, 6, dtype=torch.float64), torch.randint(0, 3, (65,))
    model = bn_net(dtype=torch.float64)
    with pytest.warns(UserWarning, match="1 sample\\(s\\) of window 2 of epoch 0 were not trained"):
        result = run(model, DataLoader(TensorDataset(x, y), batch_size=8), 32, max_micro=16)
    assert result.samples_dropped == 1
    assert result.samples_seen == 64
    assert result.optimizer_steps == 2


def test_drop_last_on_the_users_loader_is_honoured_and_counted() -> None:
    loader = DataLoader(data(20), batch_size=4, drop_last=True)
    with pytest.warns(UserWarning, match="drop_last=True"):
        result = run(mlp(), loader, 8, max_micro=4)
    assert (result.optimizer_steps, result.samples_seen, result.samples_dropped) == (2, 16, 4)


@dataclass
class Example:
    """A collate_fn's dataclass batch."""

    x: torch.Tensor
    y: torch.Tensor


def test_a_dataclass_batch_trains_like_a_tuple() -> None:
    def collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> Example:
        return Example(torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples]))

    model = mlp()
    result = run(
        model,
        DataLoader(data(), batch_size=4, collate_fn=collate),
        8,
        max_micro=3,
        loss_fn=lambda m, b: F.cross_entropy(m(b.x), b.y),
    )
    assert result.samples_seen == 20


def test_batchnorm_with_accumulation_warns() -> None:
    model = bn_net(dtype=torch.float64)
    loader = DataLoader(
        TensorDataset(torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))),
        batch_size=4,
    )
    with pytest.warns(UserWarning, match="BatchNorm"):
        run(model, loader, 8, max_micro=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(model, loader, 8, max_micro=8)


def test_result_is_plain_data() -> None:
    import json

    result = run(mlp(), DataLoader(data(), batch_size=5), 8, max_micro=3)
    encoded = json.loads(json.dumps(result.to_dict()))
    assert encoded["plan"]["micro_sizes"] == [3, 3, 2]
    assert encoded["optimizer_steps"] == 3
    assert encoded["probe"] is None


def test_demo_learns_and_accumulates(capsys: pytest.CaptureFixture[str]) -> None:
    from autoaccum import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--samples", "2000", "--epochs", "8", "--json"])
    assert demo.main(args) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["accum_iter"] > 1
    assert out["probe"]["limited_by"] == "memory"
    assert out["losses"][-1] < 0.85 * out["losses"][0]  # visibly learning
    assert sum(out["plan"]["micro_sizes"]) == 256
    # the memory explained is the emulated device's, not the host's RAM
    breakdown = out["breakdown"]
    assert breakdown["capacity"] == int(0.8 * 2**20)
    assert "emulated device" in breakdown["capacity_source"]
    assert breakdown["fixed"] + breakdown["activations"] + breakdown["headroom"] == int(0.8 * 2**20)


#: what the demo must run without: every extra's packages, the dev tools, numpy (torch does
#: not install it): ``pip install torch -e .`` is all the Quickstart's first command installs
NOT_INSTALLED = ("lightning", "pytorch_lightning", "transformers", "accelerate", "datasets")
NOT_INSTALLED += ("tensorboard", "matplotlib", "numpy", "hypothesis", "pytest")
DEMO_WITHOUT_EXTRAS = f"""
import sys
sys.modules.update(dict.fromkeys({NOT_INSTALLED!r}))  # None: an import of them fails
from autoaccum.cli import main
sys.exit(main(["demo", "--samples", "600", "--epochs", "2"]))
"""


def test_the_demo_needs_no_extra_and_prints_one_screen() -> None:
    """The Quickstart's demo: the plan in one line and why, a short summary, memory at the
    plan at a glance (memory is measured on the emulated device), the accuracy; no tables
    that say nothing; no package beyond torch and the core dependencies."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", DEMO_WITHOUT_EXTRAS],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) < 25, done.stdout
    assert lines[0].startswith("CPU: emulating a device with 0.8 MiB")
    assert lines[1] == (
        "plan: target_batch 256 = 86+85+85 (accum_iter 3) × 1 rank — 96 fit in the emulated "
        "device's 819.2 KiB, less a 2% margin: max_micro 91"
    )
    assert lines[2].startswith("done: 6 optimizer steps (2 epochs), 1,200 samples in ")
    assert lines[3].startswith("memory at micro_batch 86 (the emulated device's limit")
    assert lines[-1].startswith("train accuracy ")
    for nothing in ("1 epochs", "0.00 MiB", "Memory on", "Probe on", "100.0%", "NumPy"):
        assert nothing not in done.stdout + done.stderr, nothing
