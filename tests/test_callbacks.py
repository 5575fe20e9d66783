"""Acting along the way: the state callbacks see, stopping from one, evaluation on a second
loader, the JSON-lines log, the micro-batch changes reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import mlp
from reference import LR, ce, samples
from torch import nn
from torch.utils.data import DataLoader

import autoaccum
from autoaccum.train.callbacks import Callback, Evaluate, JsonLog, RunView


def _fit(model: nn.Module, callbacks: list[Any], **kwargs: Any) -> autoaccum.FitResult:
    kwargs.setdefault("max_micro", 4)
    return autoaccum.fit(
        model,
        DataLoader(samples(40), batch_size=8),
        8,
        loss_fn=ce,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        device="cpu",
        progress=False,
        report=False,
        callbacks=callbacks,
        **kwargs,
    )


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_step(self, run: RunView) -> None:
        self.events.append(("step", run.state()))

    def on_epoch_end(self, run: RunView) -> None:
        self.events.append(("epoch_end", run.state().epoch))

    def on_train_end(self, run: RunView) -> None:
        self.events.append(("end", run.state().step))


def test_callbacks_see_every_step_epoch_and_the_end() -> None:
    recorder = Recorder()
    result = _fit(mlp(), [recorder], epochs=2)
    steps = [state for kind, state in recorder.events if kind == "step"]
    assert [s.step for s in steps] == list(range(1, 11))
    assert [(s.epoch, s.window) for s in steps[3:6]] == [(0, 3), (0, 4), (1, 0)]
    assert [s.loss for s in steps] == list(result.losses)
    assert steps[-1].samples_seen == 80
    assert steps[0].lrs == (LR,)
    assert steps[0].micro_sizes == (4, 4)
    assert [e for e in recorder.events if e[0] != "step"] == [
        ("epoch_end", 0),
        ("epoch_end", 1),
        ("end", 10),
    ]


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, run: RunView) -> None:
        if run.state().step == self.step:
            run.stop("enough")


def test_a_callback_stops_the_run_after_its_step() -> None:
    result = _fit(mlp(), [StopAt(3)], epochs=3)
    assert result.optimizer_steps == 3
    assert result.stopped_early


def test_an_error_in_a_callback_stops_the_run_with_that_error() -> None:
    class Broken(Callback):
        def on_step(self, run: RunView) -> None:
            raise RuntimeError("the logger's disk is full")

    with pytest.raises(RuntimeError, match="disk is full"):
        _fit(mlp(), [Broken()])


def test_evaluation_on_a_second_loader_without_gradients_or_side_effects() -> None:
    evaluation = samples(12, seed=5)
    model = nn.Sequential(mlp(), nn.Dropout(0.5))
    evaluate = Evaluate(DataLoader(evaluation, batch_size=5, shuffle=True), every=2)
    torch.manual_seed(0)
    result = _fit(model, [evaluate])
    assert [m["step"] for m in result.evaluations] == [2, 4, 5]  # every 2, and at the end
    model.eval()
    with torch.no_grad():
        expected = float(ce(model, evaluation.tensors))
    assert result.evaluations[-1]["eval_loss"] == pytest.approx(expected, rel=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_evaluation_leaves_training_exactly_as_it_was() -> None:
    """Dropout, a shuffled evaluation loader: evaluating draws nothing from training's
    random streams, so the weights are those of the same run without evaluation."""
    plain, evaluated = nn.Sequential(mlp(), nn.Dropout(0.3)), nn.Sequential(mlp(), nn.Dropout(0.3))
    torch.manual_seed(0)
    _fit(plain, [])
    torch.manual_seed(0)
    _fit(evaluated, [Evaluate(DataLoader(samples(9), batch_size=4, shuffle=True), every=1)])
    assert all(
        torch.equal(p, q) for p, q in zip(plain.parameters(), evaluated.parameters(), strict=True)
    )


def test_the_json_log_has_a_line_per_step_and_per_event(tmp_path: Path) -> None:
    from helpers import OOMAbove

    log = tmp_path / "log" / "train.jsonl"
    model = nn.Sequential(mlp(), OOMAbove(3))
    evaluate = Evaluate(DataLoader(samples(6)), every=5, max_micro=2)
    with pytest.warns(UserWarning, match="out of memory"):
        _fit(model, [evaluate, JsonLog(log)])
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [line["event"] for line in lines]
    assert kinds.count("step") == 5
    assert kinds[0] == "resize"  # the first window ran out of memory at 4 and went on at 3
    assert (lines[0]["old"], lines[0]["new"], lines[0]["reason"]) == (4, 3, "oom")
    assert lines[1]["micro_sizes"] == [3, 3, 2]
    assert [line["step"] for line in lines if line["event"] == "eval"] == [5]


def test_the_last_epoch_ends_also_when_max_steps_ends_the_run_there() -> None:
    """2 epochs × 5 windows with max_steps=10: the run's last step is the last epoch's last
    window, and per-epoch work (a scheduler per epoch, an epoch log) sees that epoch end."""
    recorder = Recorder()
    _fit(mlp(), [recorder], epochs=2, max_steps=10)
    kinds = [kind for kind, _ in recorder.events]
    assert kinds[-3:] == ["step", "epoch_end", "end"]
    assert [e for e in recorder.events if e[0] == "epoch_end"] == [
        ("epoch_end", 0),
        ("epoch_end", 1),
    ]
    recorder = Recorder()
    _fit(mlp(), [recorder], epochs=2, max_steps=7)  # stopped mid-epoch: no second epoch end
    assert [e for e in recorder.events if e[0] == "epoch_end"] == [("epoch_end", 0)]


@pytest.mark.parametrize("data", [[], DataLoader(samples(0), batch_size=4)], ids=["list", "loader"])
def test_empty_evaluation_data_is_refused_at_the_start_and_named(data: Any) -> None:
    with pytest.raises(autoaccum.BatchError, match=r"the evaluation data \(\w+\) is empty"):
        Evaluate(data, every=1)


def test_evaluation_data_found_empty_when_read_is_named() -> None:
    model = mlp()
    with pytest.raises(autoaccum.BatchError, match="the evaluation data"):
        _fit(model, [Evaluate(iter([]), every=1)])


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def test_the_json_log_writes_nan_as_null_so_every_line_is_json(tmp_path: Path) -> None:
    """An evaluation whose loss is NaN (its data holds a NaN) is logged as null."""
    log = tmp_path / "train.jsonl"
    poisoned = samples(6, seed=2)
    poisoned.tensors[0][0, 0] = float("nan")
    _fit(mlp(), [Evaluate(DataLoader(poisoned), every=5, max_micro=2), JsonLog(log)])
    lines = [
        json.loads(line, parse_constant=_no_constants) for line in log.read_text().splitlines()
    ]
    evaluations = [line for line in lines if line["event"] == "eval"]
    assert evaluations == [{"event": "eval", "step": 5, "eval_loss": None}]
    assert all(isinstance(line["loss"], float) for line in lines if line["event"] == "step")


def test_an_unwritable_json_log_is_found_before_the_first_step(tmp_path: Path) -> None:
    from helpers import read_only

    afile = tmp_path / "afile"
    afile.write_text("a file")
    locked = tmp_path / "locked"
    locked.mkdir()
    for path, reason in [
        (afile / "train.jsonl", f"{afile} exists and is not a folder"),
        (afile / "logs" / "train.jsonl", "Not a directory"),
        (tmp_path, "Is a directory"),
        (locked / "train.jsonl", "(Permission denied|Operation not permitted)"),
    ]:
        recorder = Recorder()
        with read_only(locked), pytest.raises(autoaccum.ConfigError, match=f"{path}: {reason}"):
            _fit(mlp(), [recorder, JsonLog(path)])
        assert not [kind for kind, _ in recorder.events if kind == "step"]


def test_on_train_start_is_called_once_before_the_first_step() -> None:
    class Starts(Recorder):
        def on_train_start(self, run: RunView) -> None:
            self.events.append(("start", run.run_id))

    recorder = Starts()
    _fit(mlp(), [recorder], max_steps=2)
    kinds = [kind for kind, _ in recorder.events]
    assert kinds == ["start", "step", "step", "end"]
    assert isinstance(recorder.events[0][1], str)
    assert len(recorder.events[0][1]) == 32


def test_on_resize_sees_every_change_and_on_oom_its_old_name_still_works() -> None:
    """``on_oom`` was renamed ``on_resize`` (it also fires when the micro-batch grows back);
    a callback with the old name is still called, with a deprecation warning, for a release."""
    from helpers import OOMAbove

    from autoaccum.results import Resize

    class New(Callback):
        def __init__(self) -> None:
            self.seen: list[Resize] = []

        def on_resize(self, run: RunView, resize: Resize) -> None:
            self.seen.append(resize)

    class Old:
        def __init__(self) -> None:
            self.seen: list[Resize] = []

        def on_oom(self, run: RunView, resize: Resize) -> None:
            self.seen.append(resize)

    new, old = New(), Old()
    with pytest.warns(DeprecationWarning, match="Old.on_oom is now on_resize"):
        result = _fit(nn.Sequential(mlp(), OOMAbove(3)), [new, old])
    assert new.seen == old.seen == list(result.resizes)
    assert [(r.old, r.new, r.reason) for r in new.seen] == [(4, 3, "oom")]
    with pytest.warns(DeprecationWarning, match="items_seen"):
        assert result.tokens_seen == result.items_seen == 40


def test_tensorboard_gets_the_loss_lr_counts_plan_resizes_and_evaluations(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from helpers import OOMAbove
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    model = nn.Sequential(mlp(), OOMAbove(3))
    evaluate = Evaluate(DataLoader(samples(6)), every=5, max_micro=2)
    with pytest.warns(UserWarning, match="out of memory"):
        result = _fit(model, [evaluate, autoaccum.TensorBoard(tmp_path / "tb")])
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    def texts(tag: str) -> list[tuple[int, str]]:
        found = events.Tensors(f"{tag}/text_summary")
        return [(e.step, make_ndarray(e.tensor_proto).item().decode()) for e in found]

    assert scalars("train/loss") == [
        (i, pytest.approx(loss, rel=1e-6)) for i, loss in enumerate(result.losses, start=1)
    ]
    assert scalars("train/lr") == [(i, pytest.approx(LR)) for i in range(1, 6)]
    assert scalars("train/samples_seen") == [(i, 8.0 * i) for i in range(1, 6)]
    assert scalars("train/items_seen") == [(i, 8.0 * i) for i in range(1, 6)]
    assert texts("autoaccum/plan") == [(0, "target_batch 8 = 4 × 2 (accum_iter 2) × 1 rank")]
    # the first window ran out of memory at 4 and went on at 3: written at its step
    assert scalars("plan/micro_batch") == [(0, 4.0), (1, 3.0)]
    assert scalars("plan/accum_iter") == [(0, 2.0), (1, 3.0)]
    assert texts("autoaccum/resize") == [
        (1, "micro-batch 4 → 3 (oom) in epoch 0, window 0: target_batch 8 = 3+3+2 (accum_iter 3) "
         "× 1 rank")
    ]  # fmt: skip
    assert scalars("eval/eval_loss") == [(5, pytest.approx(result.evaluations[0]["eval_loss"]))]


def test_tensorboard_without_the_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import hide_package

    hide_package(monkeypatch, "tensorboard")
    with pytest.raises(
        autoaccum.MissingExtraError, match=r"pip install 'autoaccum\[tensorboard\]'"
    ):
        autoaccum.TensorBoard("runs")
