"""autoaccum.lightning: AutoAccum against the real Lightning, on the CPU, in float64.

Exact (equal to full-window SGD within 1e-10): a sample-mean loss over full windows of equal
micro-batches, on one process and under DDP. Not exact, and shown to fail the same check:
the short last window of an epoch (unless ``drop_last=True``) and token-level losses.
"""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import OOMAbove, bn_net, hide_package, mlp
from launch import run
from lightning.pytorch import LightningDataModule
from lightning.pytorch.core.saving import load_hparams_from_yaml
from lightning.pytorch.loggers import CSVLogger
from lightning_ddp_worker import RANK1_LIMIT, SAMPLES, TARGET, Net, Record, trainer
from reference import LR, ce, reference, rel_diff, samples, token_ce, token_model, tokens
from reference import windows_of as windows
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, get_worker_info

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


@pytest.fixture
def shown() -> Iterator[list[str]]:
    """The lines of Lightning's rank-zero log, which shows them without any logging set-up:
    Lightning sets its logger to INFO (set again here: another test in this process may have
    quietened it) and gives it a handler of its own when logging is not configured. The DDP
    test sees them in a fresh process's stderr."""
    top = logging.getLogger("lightning.pytorch")
    level = top.level
    top.setLevel(logging.INFO)
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Keep()
    log.addHandler(handler)
    yield lines
    log.removeHandler(handler)
    top.setLevel(level)


def ours(caught: pytest.WarningsRecorder) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("AutoAccum")]


def fit(
    model: Net, data: object, auto: AutoAccum, *, shuffle: bool = False, **options: Any
) -> Record:
    record = Record()
    loader = DataLoader(data, batch_size=7, shuffle=shuffle)  # type: ignore[arg-type]
    trainer(auto, record, **options).fit(model, loader)
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


def test_probe_picks_the_divisor_and_the_plan_line_shows_once_and_goes_to_the_loggers(
    shown: list[str],
    caplog: pytest.LogCaptureFixture,
    recwarn: pytest.WarningsRecorder,
    tmp_path: Path,
) -> None:
    model = Net(mlp(limit=20), ce, LR)
    auto = AutoAccum(50)
    csv = CSVLogger(tmp_path)
    with caplog.at_level(logging.DEBUG):
        record = fit(model, samples(100), auto, logger=csv)
    assert auto.batching is not None
    assert auto.batching.probe is not None
    assert auto.batching.probe.largest_pass == 20  # the 2% margin then takes one sample
    plan = auto.batching.plan
    assert (plan.max_micro, plan.micro_batch, plan.accum_iter) == (19, 10, 5)
    assert plan.micro_batch * plan.accum_iter * plan.world_size == 50
    assert record.accumulate == 5
    assert record.sizes == [10] * 10
    assert record.steps == 2
    assert [line for line in shown if "target_batch" in line] == [
        "AutoAccum: target_batch 50 = 10 × 5 (accumulate_grad_batches) × 1 device(s); per-device "
        "share 50, ceiling 19: Lightning needs equal micro-batches, so 10 × 5 (autoaccum.fit would "
        "use 17+17+16): 7 samples fewer per micro-batch, 2 more micro-steps per optimizer step"
    ]  # once, one prefix
    assert not [r for r in caplog.records if r.name.startswith("autoaccum")]  # not twice
    said = [str(w.message) for w in recwarn if "number of training batches" in str(w.message)]
    assert [s.split(")")[0] for s in said] == ["The number of training batches (10"]  # the loader
    # trained; not also the 15 batches of the loader given, read only to be re-batched
    assert oom_layer(model).sizes[-1] == 10  # the probe left the model; training ran at 10
    hparams = load_hparams_from_yaml(Path(csv.log_dir) / "hparams.yaml")
    assert {k: v for k, v in hparams.items() if k.startswith("autoaccum/")} == {
        "autoaccum/target_batch": 50,
        "autoaccum/micro_batch": 10,
        "autoaccum/accum_iter": 5,
        "autoaccum/world_size": 1,
        "autoaccum/max_micro": 19,
        "autoaccum/largest_pass": 20,
    }


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


def test_short_last_window_is_misweighted_and_drop_last_fixes_it(shown: list[str]) -> None:
    data = samples(100)  # 3 windows of 32 and one of 4
    model, ref = Net(mlp(), ce, LR), mlp()
    with pytest.warns(
        UserWarning, match="holds 4 samples per device in 1 micro-batch instead of 32 in 4 of 8"
    ):
        fit(model, data, AutoAccum(32, max_micro=8))
    reference(ref, windows(data, 32), ce)
    assert rel_diff(model, ref) > 1e-4  # Lightning divides the 4-sample window's loss by 4

    model, ref = Net(mlp(), ce, LR), mlp()
    auto = AutoAccum(32, max_micro=8, drop_last=True)
    record = fit(model, data, auto)
    assert record.sizes == [8] * 12
    assert record.steps == 3
    assert auto.batching is not None
    assert auto.batching.dropped == 4
    assert "AutoAccum: drop_last leaves out 4 samples/device/epoch" in shown
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
    """The samples of ``samples(n)`` streamed; with workers, worker w streams w, w + W, …"""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = samples(self.n).tensors
        info = get_worker_info()
        start, step = (info.id, info.num_workers) if info is not None else (0, 1)
        return iter(zip(x[start::step], y[start::step], strict=True))


class HookNet(Net):
    """Gives its own train_dataloader(): the source Lightning asks the loader from."""

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(samples(32), batch_size=3)


class Data(LightningDataModule):
    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(samples(24), batch_size=5)


def test_loaders_from_a_hook_a_datamodule_and_an_iterable_dataset_are_re_batched(
    recwarn: pytest.WarningsRecorder,
) -> None:
    record = Record()
    trainer(AutoAccum(16, max_micro=5), record).fit(HookNet(mlp(), ce, LR))
    assert record.sizes == [4] * 8
    assert record.accumulate == 4

    record = Record()
    trainer(AutoAccum(12, max_micro=5), record).fit(Net(mlp(), ce, LR), datamodule=Data())
    assert (record.sizes, record.accumulate, record.steps) == ([4] * 6, 3, 2)

    auto, record = AutoAccum(8), Record()
    trainer(auto, record).fit(Net(mlp(limit=3), ce, LR), DataLoader(Stream(24), batch_size=6))
    assert auto.batching is not None
    assert (auto.batching.plan.micro_batch, auto.batching.last_window) == (2, 0)
    assert record.sizes == [2] * 12
    assert not ours(recwarn)  # whole windows: nothing to say


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_with_drop_last_trains_whole_windows_only(
    workers: int, shown: list[str], recwarn: pytest.WarningsRecorder
) -> None:
    # 17 samples, micro-batches of 5, windows of 10: one whole window. With 2 workers (9 and
    # 8 samples each) the whole window is each worker's first 5, and each worker's short
    # batch is left out: samples 0..9 either way
    model, ref = Net(mlp(), ce, LR), mlp()
    auto, record = AutoAccum(10, max_micro=5, drop_last=True), Record()
    loader = DataLoader(Stream(17), batch_size=4, num_workers=workers)
    trainer(auto, record).fit(model, loader)
    assert (record.sizes, record.steps) == ([5, 5], 1)
    assert auto.batching is not None
    assert (auto.batching.last_window, auto.batching.dropped) == (0, 7)
    assert "AutoAccum: drop_last left out 7 samples of the stream on this device in epoch 0" in (
        " ".join(shown)
    )
    assert not ours(recwarn)
    reference(ref, windows(samples(17), 10)[:1], ce)
    assert rel_diff(model, ref) < TOL


def test_a_streams_short_last_window_is_warned_about(recwarn: pytest.WarningsRecorder) -> None:
    model, ref = Net(mlp(), ce, LR), mlp()
    auto, record = AutoAccum(10, max_micro=5), Record()
    trainer(auto, record).fit(model, DataLoader(Stream(17), batch_size=4))
    assert (record.sizes, record.steps) == ([5, 5, 5, 2], 2)
    assert auto.batching is not None
    assert (auto.batching.last_window, auto.batching.dropped) == (7, 0)
    assert [w.split(";")[0] for w in ours(recwarn)] == [
        "AutoAccum: a window of epoch 0 holds 7 samples per device in 2 micro-batches instead "
        "of 10 in 2 of 5"
    ]
    reference(ref, windows(samples(17), 10), ce)
    assert rel_diff(model, ref) > 1e-3  # the 7 samples' step: (mean of 5 + mean of 2) / 2


def test_one_micro_batch_per_window_makes_the_short_window_exact_and_unwarned(
    recwarn: pytest.WarningsRecorder,
) -> None:
    data = samples(100)
    model, ref = Net(mlp(), ce, LR), mlp()
    auto = AutoAccum(32)  # the probe fits the whole window on the CPU: 32 × 1
    fit(model, data, auto)
    assert auto.batching is not None
    assert (auto.batching.plan.accum_iter, auto.batching.last_window) == (1, 4)
    reference(ref, windows(data, 32), ce)  # the last window: its own 4 samples' mean
    assert rel_diff(model, ref) < TOL

    model, ref = Net(mlp(), ce, LR), mlp()
    record = Record()
    trainer(AutoAccum(10), record).fit(model, DataLoader(Stream(17), batch_size=4))
    assert record.sizes == [10, 7]
    reference(ref, windows(samples(17), 10), ce)
    assert rel_diff(model, ref) < TOL
    assert not ours(recwarn)


class Rows(Record):
    """Also the inputs each epoch trained on, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[list[torch.Tensor]] = []

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.epochs.append([])

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, idx)
        self.epochs[-1].append(batch[0].detach().clone())


def test_shuffled_epochs_keep_lightnings_order_and_every_step_is_exact() -> None:
    data = samples(96)
    auto_model, plain_model, ref = Net(mlp(), ce, LR), Net(mlp(), ce, LR), mlp()
    rows = Rows()
    torch.manual_seed(3)
    trainer(AutoAccum(32, max_micro=8), rows, max_epochs=2).fit(
        auto_model, DataLoader(data, batch_size=7, shuffle=True)
    )
    torch.manual_seed(3)  # plain Lightning, micro-batches of 8 accumulated 4 times
    trainer(Record(), max_epochs=2, accumulate_grad_batches=4).fit(
        plain_model, DataLoader(data, batch_size=8, shuffle=True)
    )
    pairs = zip(auto_model.parameters(), plain_model.parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)  # the same order, the same steps
    x, y = data.tensors
    orders = [
        (torch.cat(epoch)[:, None, :] == x[None]).all(-1).nonzero()[:, 1] for epoch in rows.epochs
    ]
    assert [sorted(o.tolist()) for o in orders] == [list(range(96))] * 2  # each sample once
    assert not torch.equal(orders[0], orders[1])  # reshuffled
    order = torch.cat(orders)
    reference(ref, windows(TensorDataset(x[order], y[order]), 32), ce)
    assert rel_diff(auto_model, ref) < TOL


def test_limit_train_batches_counts_micro_batches_and_drop_last_keeps_windows_whole(
    recwarn: pytest.WarningsRecorder,
) -> None:
    record = fit(Net(mlp(), ce, LR), samples(96), AutoAccum(32, max_micro=8), limit_train_batches=5)
    assert (record.sizes, record.steps) == ([8] * 5, 2)  # 4 + 1: the second window is short
    assert [w.split(";")[0] for w in ours(recwarn)] == [
        "AutoAccum: the last window of every epoch holds 8 samples per device in 1 micro-batch "
        "instead of 32 in 4 of 8"
    ]
    auto = AutoAccum(32, max_micro=8, drop_last=True)
    run = trainer(auto, record := Record(), limit_train_batches=5)
    run.fit(Net(mlp(), ce, LR), DataLoader(samples(96), batch_size=7))
    assert (record.sizes, record.steps) == ([8] * 4, 1)
    assert run.limit_train_batches == 5  # given back

    record = Record()
    trainer(AutoAccum(10, max_micro=5, drop_last=True), record, limit_train_batches=3).fit(
        Net(mlp(), ce, LR), DataLoader(Stream(40), batch_size=4)
    )
    assert (record.sizes, record.steps) == ([5, 5], 1)
    with pytest.raises(ConfigError, match="limit_train_batches=1 is less than one window of 2"):
        trainer(AutoAccum(10, max_micro=5, drop_last=True), limit_train_batches=1).fit(
            Net(mlp(), ce, LR), DataLoader(Stream(40), batch_size=4)
        )
    with pytest.raises(ConfigError, match=r"held 7 samples .* less than one window of 10"):
        trainer(AutoAccum(10, max_micro=5, drop_last=True)).fit(
            Net(mlp(), ce, LR), DataLoader(Stream(7), batch_size=4)
        )  # a stream is measured as it passes: at the end of its first epoch
    assert len(ours(recwarn)) == 1  # only the first run's


def test_manual_optimization_is_refused() -> None:
    model = Net(mlp(), ce, LR)
    model.automatic_optimization = False
    with pytest.raises(ConfigError, match="automatic optimization"):
        fit(model, samples(8), AutoAccum(4))


# ------------------------------------------------------------------ DDP, 2 processes


@pytest.mark.distributed
def test_ddp_ranks_agree_and_the_step_is_exact(tmp_path: Path) -> None:
    launch = run(WORKER, str(tmp_path), folder=tmp_path, bound=BOUND, nproc=2)
    shown = launch.report()
    # no logging set up in the workers: the plan line shows by default, once, on rank 0 only
    plan_lines = [
        [line for line in launch.rank_logs[r].splitlines() if "target_batch" in line]
        for r in (0, 1)
    ]
    assert plan_lines[1] == [], shown
    assert plan_lines[0] == [
        "AutoAccum: target_batch 16 = 4 × 2 (accumulate_grad_batches) × 2 device(s); per-device "
        "share 8, ceiling 5: 4 × 2, as autoaccum.fit would run it"
    ], shown
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
