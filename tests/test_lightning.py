"""autoaccum.lightning: AutoAccum against the real Lightning, on the CPU, in float64.

Exact (equal to full-window SGD within 1e-10): a sample-mean loss over full windows of equal
micro-batches, on one process and under DDP. Not exact, and shown to fail the same check:
the short last window of an epoch (unless ``drop_last=True``) and token-level losses.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import OOMAbove, bn_net, hide_package, mlp
from launch import run
from lightning_ddp_worker import RANK1_LIMIT, SAMPLES, TARGET, Net, Record, trainer
from reference import LR, ce, reference, rel_diff, samples, token_ce, token_model, tokens
from reference import windows_of as windows
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from autoaccum import ConfigError, PlanError
from autoaccum.errors import MissingExtraError
from autoaccum.lightning import AutoAccum, equal_plan

TOL = 1e-10
WORKER = Path(__file__).parent / "lightning_ddp_worker.py"
BOUND = 180.0  #: seconds for the 2-process DDP launch before it counts as a hang


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


def fit(model: Net, data: object, auto: AutoAccum, *, shuffle: bool = False) -> Record:
    record = Record()
    loader = DataLoader(data, batch_size=7, shuffle=shuffle)  # type: ignore[arg-type]
    trainer(auto, record).fit(model, loader)
    return record


def oom_layer(model: Net) -> OOMAbove:
    return next(m for m in model.modules() if isinstance(m, OOMAbove))


# ------------------------------------------------------------------ the plan


def test_equal_plan_takes_the_largest_divisor_under_the_ceiling() -> None:
    plan = equal_plan(96, 40)
    assert (plan.micro_batch, plan.accum_iter, plan.max_micro) == (32, 3, 40)
    plan = equal_plan(100, 40, world_size=2)  # share 50: fit would run 25+25, so would this
    assert (plan.micro_batch, plan.accum_iter) == (25, 2)
    assert equal_plan(97, 40).micro_batch == 1  # a prime share: one sample at a time


def test_a_target_that_does_not_divide_among_ranks_names_the_valid_ones() -> None:
    with pytest.raises(PlanError, match="target_batch=14 or 16"):
        equal_plan(15, 8, world_size=2)


def test_batchnorm_and_a_prime_share_name_targets_that_work() -> None:
    with pytest.raises(PlanError, match="target_batch=96 or 98"):
        equal_plan(97, 40, min_micro=2)


# ------------------------------------------------------------------ one process


def test_probe_picks_the_divisor_and_the_log_says_what_fit_would_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = Net(mlp(limit=20), ce, LR)
    auto = AutoAccum(50)
    with caplog.at_level("INFO", logger="autoaccum.lightning"):
        record = fit(model, samples(100), auto)
    assert auto.batching is not None
    assert auto.batching.probe is not None
    assert auto.batching.probe.largest_pass == 20  # the 2% margin then takes one sample
    plan = auto.batching.plan
    assert (plan.max_micro, plan.micro_batch, plan.accum_iter) == (19, 10, 5)
    assert plan.micro_batch * plan.accum_iter * plan.world_size == 50
    assert record.accumulate == 5
    assert record.sizes == [10] * 10
    assert record.steps == 2
    assert (
        "target_batch 50 = 10 × 5 (accumulate_grad_batches) × 1 device(s); per-device share 50, "
        "ceiling 19: Lightning needs equal micro-batches, so 10 × 5 (autoaccum.fit would use "
        "17+17+16): 7 samples fewer per micro-batch, 2 more micro-steps per optimizer step"
    ) in caplog.text
    assert oom_layer(model).sizes[-1] == 10  # the probe left the model; training ran at 10


def test_full_windows_equal_full_batch_sgd() -> None:
    data = samples(96)
    model, ref = Net(mlp(limit=10), ce, LR), mlp()
    record = fit(model, data, AutoAccum(32))  # ceiling 9 → 8 × 4
    assert record.sizes == [8] * 12
    assert record.accumulate == 4
    assert record.steps == 3
    reference(ref, windows(data, 32), ce)
    assert rel_diff(model, ref) < TOL


def test_the_probe_leaves_no_trace_in_weights_or_random_order() -> None:
    data = samples(96)
    probed, given = Net(mlp(limit=10), ce, LR), Net(mlp(), ce, LR)
    torch.manual_seed(1)
    fit(probed, data, AutoAccum(32), shuffle=True)  # probes: ceiling 9 → 8 × 4
    torch.manual_seed(1)
    fit(given, data, AutoAccum(32, max_micro=8), shuffle=True)  # no probe
    pairs = zip(probed.parameters(), given.parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)


def test_short_last_window_is_misweighted_and_drop_last_fixes_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = samples(100)  # 3 windows of 32 and one of 4
    model, ref = Net(mlp(), ce, LR), mlp()
    with pytest.warns(
        UserWarning, match="holds 4 samples per device .1 of 4 micro-batches. instead of 32"
    ):
        fit(model, data, AutoAccum(32, max_micro=8))
    reference(ref, windows(data, 32), ce)
    assert rel_diff(model, ref) > 1e-4  # Lightning divides the 4-sample window's loss by 4

    model, ref = Net(mlp(), ce, LR), mlp()
    auto = AutoAccum(32, max_micro=8, drop_last=True)
    with caplog.at_level("INFO", logger="autoaccum.lightning"):
        record = fit(model, data, auto)
    assert record.sizes == [8] * 12
    assert record.steps == 3
    assert auto.batching is not None
    assert auto.batching.dropped == 4
    assert "drop_last leaves out 4 samples/device/epoch" in caplog.text
    reference(ref, windows(data, 32)[:3], ce)
    assert rel_diff(model, ref) < TOL


def test_token_level_losses_are_averaged_per_micro_batch() -> None:
    data = tokens(32)
    model, ref = Net(token_model(), token_ce, LR), token_model()
    fit(model, data, AutoAccum(16, max_micro=4))
    reference(ref, windows(data, 16), token_ce)
    assert rel_diff(model, ref) > 1e-4  # the mean of per-micro-batch means, not per token


def test_batchnorm_is_never_probed_below_two_samples() -> None:
    torch.manual_seed(0)
    model = Net(bn_net(limit=3, dtype=torch.float64), ce, LR)
    data = TensorDataset(torch.randn(24, 6, dtype=torch.float64), samples(24).tensors[1])
    auto = AutoAccum(12)
    fit(model, data, auto)
    assert auto.batching is not None
    assert auto.batching.probe is not None
    assert min(t.size for t in auto.batching.probe.trials) == 2
    assert auto.batching.probe.largest_pass == 3
    assert auto.batching.plan.micro_batch == 2  # ceiling 2 (3 passes, less the margin)


class Stream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = samples(20).tensors
        return iter(zip(x, y, strict=True))


class HookNet(Net):
    """Gives its own train_dataloader(): the source Lightning asks the loader from."""

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(samples(32), batch_size=3)


def test_loaders_from_a_hook_and_from_an_iterable_dataset_are_re_batched() -> None:
    record = Record()
    trainer(AutoAccum(16, max_micro=5), record).fit(HookNet(mlp(), ce, LR))
    assert record.sizes == [4] * 8
    assert record.accumulate == 4

    auto, record = AutoAccum(8), Record()
    trainer(auto, record).fit(Net(mlp(limit=3), ce, LR), DataLoader(Stream(), batch_size=6))
    assert auto.batching is not None
    assert (auto.batching.plan.micro_batch, auto.batching.last_window) == (2, None)
    assert record.sizes == [2] * 10


def test_manual_optimization_is_refused() -> None:
    model = Net(mlp(), ce, LR)
    model.automatic_optimization = False
    with pytest.raises(ConfigError, match="automatic optimization"):
        fit(model, samples(8), AutoAccum(4))


# ------------------------------------------------------------------ DDP, 2 processes


@pytest.mark.distributed
def test_ddp_ranks_agree_and_the_step_is_exact(tmp_path: Path) -> None:
    run(WORKER, str(tmp_path), folder=tmp_path, bound=BOUND, nproc=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for saved in ranks:
        assert saved["world"] == 2
        # rank 1 fails above 6: rank 0 counts those sizes as failed too, so both end on 6 − 1
        assert (saved["ceiling"], saved["micro"], saved["accumulate"]) == (5, 4, 2)
        assert saved["micro"] * saved["accumulate"] * saved["world"] == TARGET
        assert saved["sizes"] == [4] * (SAMPLES // 2 // 4)
        assert saved["steps"] == SAMPLES // TARGET
    assert [t[:2] for t in ranks[0]["trials"]] == [t[:2] for t in ranks[1]["trials"]]
    failed = {t[0]: t[2] for t in ranks[0]["trials"] if not t[1]}
    assert failed
    assert all(size > RANK1_LIMIT for size in failed)
    assert set(failed.values()) == {"oom (another rank)"}
    # Lightning's DistributedSampler (seed 0, shuffled): rank r reads perm[r::2]; global window
    # k is both ranks' k-th share of 8
    data = samples(SAMPLES)
    perm = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(0))
    shares = [perm[r::2] for r in (0, 1)]
    order = torch.cat([torch.cat([s[k * 8 : (k + 1) * 8] for s in shares]) for k in range(4)])
    ref = mlp()
    reference(ref, windows(TensorDataset(*data[order]), TARGET), ce)
    for saved in ranks:
        got = [
            torch.tensor(p, dtype=torch.float64).reshape(q.shape)
            for p, q in zip(saved["params"], ref.parameters(), strict=True)
        ]
        assert rel_diff(got, ref) < TOL


# ------------------------------------------------------------------ the optional extra


def test_import_autoaccum_imports_neither_integration() -> None:
    code = (
        "import sys, autoaccum; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'lightning', 'pytorch_lightning', 'transformers', 'accelerate'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_without_lightning_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_package(monkeypatch, "lightning", "autoaccum.lightning")
    with pytest.raises(MissingExtraError, match=r"pip install 'autoaccum\[lightning\]'"):
        importlib.import_module("autoaccum.lightning")
