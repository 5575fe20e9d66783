"""Checkpoints and the exact resume: N steps straight equal k steps, a stop, and a new process
resuming the other N − k, bit for bit; atomic files; a folder that never loses a run's files
(run ids, keep=, the temporaries' sweep, another run's folder refused); the newest readable
checkpoint of a folder; resume="auto"."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import OOM, mlp
from reference import ce, samples
from resume_job import job
from torch import nn
from torch.utils.data import DataLoader

import autoaccum
from autoaccum import ConfigError
from autoaccum.step.rng import RngState
from autoaccum.train import checkpoint
from autoaccum.train.callbacks import Callback, Checkpoint, RunView
from autoaccum.train.checkpoint_random import encode_random

TESTS = Path(__file__).parent
pytestmark = pytest.mark.xdist_group("checkpoint")  # one worker: the runs fixture is shared


def resume_in_a_new_process(out: Path, steps: int, resume: Path) -> dict[str, Any]:
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{TESTS.parent}"}
    done = subprocess.run(
        [sys.executable, str(TESTS / "resume_job.py"), str(out), str(steps), str(resume)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = torch.load(out / "result.pt")
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The job run straight to 9 steps, and the same job stopped after 5 (in epoch 1)."""
    straight = tmp_path_factory.mktemp("straight")
    job(straight, 9, None)
    first = tmp_path_factory.mktemp("first")
    stopped = job(first, 5, None)  # 4 windows an epoch: step 5 is inside epoch 1
    assert stopped.optimizer_steps == 5
    return straight, first


def test_a_resumed_run_is_bit_identical_to_the_run_that_never_stopped(
    runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Shuffled multi-worker loading, dropout, AdamW, a scheduler, token-weighted losses, a
    stop in the middle of an epoch: every random stream and every state comes back."""
    straight, first = runs
    assert checkpoint.latest(first / "ckpt") == first / "ckpt" / "step-00000005.pt"
    resumed = resume_in_a_new_process(tmp_path / "resumed", 9, first / "ckpt")
    expected = torch.load(straight / "result.pt")
    assert len(resumed["losses"]) == 9  # the losses before the stop come back too
    assert resumed["losses"] == expected["losses"]
    for p, q in zip(resumed["params"], expected["params"], strict=True):
        assert torch.equal(p, q)
    # the resumed run went on with the same run id, in the same folder
    run_id = checkpoint.read(first / "ckpt" / "step-00000005.pt").run_id
    assert checkpoint.read(tmp_path / "resumed" / "ckpt" / "step-00000009.pt").run_id == run_id


def test_resuming_without_the_random_state_would_not_be_exact(
    runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Negative control: continuing from the weights and optimizer alone (another random
    state) ends elsewhere."""
    straight, first = runs
    raw = torch.load(first / "ckpt" / "step-00000005.pt", weights_only=True)
    torch.manual_seed(999)  # as if the random state had not been saved: any other state
    for state in raw["random"]:
        state["now"] = encode_random(RngState.capture(), None)["now"]
    altered = tmp_path / "altered"
    altered.mkdir()
    torch.save(raw, altered / "step-00000005.pt")
    resumed = resume_in_a_new_process(tmp_path / "resumed", 9, altered)
    expected = torch.load(straight / "result.pt")
    assert any(
        not torch.equal(p, q) for p, q in zip(resumed["params"], expected["params"], strict=True)
    )


def _fit(model: nn.Module | None = None, **kwargs: Any) -> autoaccum.FitResult:
    model = model if model is not None else mlp()
    return autoaccum.fit(
        model,
        DataLoader(samples(40), batch_size=8),
        8,
        loss_fn=ce,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        max_micro=4,
        device="cpu",
        progress=False,
        report=False,
        **kwargs,
    )


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_checkpoints_are_atomic_and_only_the_last_k_are_kept(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    _fit(callbacks=[Checkpoint(folder, every=1, keep=2)])
    assert _names(folder) == ["latest", "step-00000004.pt", "step-00000005.pt"]
    pointer = json.loads((folder / "latest").read_text())
    digests = {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in ("step-00000004.pt", "step-00000005.pt")
    }
    assert pointer == {
        "checkpoint": "step-00000005.pt",
        "run_id": checkpoint.load(folder).run_id,
        "sha256": digests,
    }
    assert checkpoint.load(folder).position.steps == 5


def test_the_plan_the_probe_and_the_resizes_come_back_without_probing_again(
    tmp_path: Path,
) -> None:
    """A probed plan (no max_micro), then an out-of-memory error in training (resized from 4
    to 3): the resumed run keeps all three as they were, to the trials' timings."""
    folder = tmp_path / "ckpt"
    data = DataLoader(samples(40), batch_size=8)

    def fit(model: nn.Module, **kwargs: Any) -> autoaccum.FitResult:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return autoaccum.fit(
            model, data, 8, loss_fn=ce, optimizer=optimizer, device="cpu", progress=False,
            report=False, **kwargs,
        )  # fmt: skip

    class Limited(nn.Module):
        def __init__(self, limit: int) -> None:
            super().__init__()
            self.net, self.limit = mlp(), limit

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() and x.shape[0] > self.limit:
                raise OOM(f"CUDA out of memory. Tried to allocate {x.shape[0]} MiB (injected)")
            return self.net(x)

    class Tighter(Callback):  # after the probe, less memory than it found: a resize follows
        def on_train_start(self, run: RunView) -> None:
            model.limit = run.plan.micro_batch - 1

    model = Limited(6)
    with pytest.warns(UserWarning, match="out of memory"):
        first = fit(model, max_steps=2, callbacks=[Tighter(), Checkpoint(folder, every=2)])
    assert first.probe is not None
    assert first.probe.trials
    assert [(r.new, r.reason) for r in first.resizes] == [(model.limit, "oom")]
    saved = checkpoint.load(folder)
    assert (saved.plan, saved.probe, saved.resizer.resizes) == (
        first.plan,
        first.probe,
        first.resizes,
    )
    resumed = fit(Limited(model.limit), max_steps=4, resume=folder)
    assert resumed.probe == first.probe  # not probed again: the very trials, timings included
    assert resumed.resizes == first.resizes
    assert resumed.plan == first.plan


class Steps(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step(self, run: RunView) -> None:
        self.steps += 1


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_a_new_run_is_refused_a_folder_holding_another_runs_checkpoints(tmp_path: Path) -> None:
    """Before its first step, saying what is there and what to do; the old run's files stay
    untouched."""
    folder = tmp_path / "ckpt"
    _fit(callbacks=[Checkpoint(folder, every=2, keep=3)])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    model, steps = mlp(seed=1), Steps()
    weights = _params(model)
    with pytest.raises(ConfigError, match="another run's checkpoints") as refused:
        _fit(model, callbacks=[steps, Checkpoint(folder, every=1, keep=3)])
    for what in ("step-00000005.pt", "resume='auto'", "another folder", "overwrite=True"):
        assert what in str(refused.value)
    assert steps.steps == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights, strict=True))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_overwrite_starts_a_new_run_that_replaces_only_autoaccums_files(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    _fit(callbacks=[Checkpoint(folder, every=1, keep=5)])
    old_id = checkpoint.load(folder).run_id
    (folder / "notes.txt").write_text("mine")
    (folder / ".notes.tmp-backup").write_text("mine too")
    _fit(max_steps=2, callbacks=[Checkpoint(folder, every=1, keep=5, overwrite=True)])
    assert _names(folder) == [
        ".notes.tmp-backup",
        "latest",
        "notes.txt",
        "step-00000001.pt",
        "step-00000002.pt",
    ]
    new = checkpoint.load(folder)
    assert new.run_id != old_id
    assert new.position.steps == 2


def test_keep_and_the_sweep_delete_only_what_this_run_wrote(tmp_path: Path) -> None:
    """A user's file of the checkpoints' naming, a user's '.x.tmp-y' file and another run's
    temporary survive a resumed run's keep= and its sweep; this run's crash leftovers go."""
    folder = tmp_path / "ckpt"
    _fit(max_steps=3, callbacks=[Checkpoint(folder, every=1, keep=2)])
    run_id = checkpoint.load(folder).run_id
    users = {
        "step-00000000.pt": b"my own file",
        ".notes.tmp-backup": b"mine",
        f".step-00000002.pt.tmp-{'e' * 32}-99": b"another run's crash",
    }
    for name, data in users.items():
        (folder / name).write_bytes(data)
    (folder / f".step-00000004.pt.tmp-{run_id}-12345").write_bytes(b"this run's crash")
    with pytest.warns(UserWarning, match="continuing from"):
        result = _fit(resume="auto", callbacks=[Checkpoint(folder, every=1, keep=1)])
    assert result.optimizer_steps == 5
    assert _names(folder) == sorted([*users, "latest", "step-00000005.pt"])
    assert all((folder / name).read_bytes() == data for name, data in users.items())


class AnotherRunMeanwhile(Callback):
    """After this run's first step, a second run trains into the same folder (its own fit)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_step(self, run: RunView) -> None:
        if run.state().step == 1:
            _fit(mlp(seed=2), max_steps=2, callbacks=[Checkpoint(self.folder, every=1)])


def test_two_runs_writing_into_one_folder_never_overwrite_each_other(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    with pytest.raises(ConfigError, match=r"another run writes checkpoints to .* same time"):
        _fit(callbacks=[AnotherRunMeanwhile(folder), Checkpoint(folder, every=2)])
    other = checkpoint.load(folder)  # the run that wrote first keeps its files
    assert _names(folder) == ["latest", "step-00000001.pt", "step-00000002.pt"]
    assert checkpoint.read(folder / "step-00000001.pt").run_id == other.run_id


def test_what_is_in_the_way_of_a_checkpoint_is_never_overwritten(tmp_path: Path) -> None:
    """A directory of a checkpoint's name is passed over when looking for checkpoints, and
    refused, untouched, when the run reaches its step."""
    folder = tmp_path / "ckpt"
    (folder / "step-00000002.pt").mkdir(parents=True)
    (folder / "step-00000002.pt" / "mine").write_text("kept")
    with pytest.raises(ConfigError, match=r"step-00000002.pt is in the way"):
        _fit(callbacks=[Checkpoint(folder, every=1)])
    assert (folder / "step-00000002.pt" / "mine").read_text() == "kept"
    assert checkpoint.load(folder).position.steps == 1


def _crash_at_save(monkeypatch: pytest.MonkeyPatch, at: int, error: OSError) -> None:
    """torch.save writes half the checkpoint and raises ``error`` at the ``at``-th save."""
    real_save, calls = torch.save, [0]

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        into_a_file = isinstance(getattr(f, "name", None), str)  # not a check in memory
        calls[0] += into_a_file
        if not into_a_file or calls[0] != at:
            real_save(obj, f, *args, **kwargs)
            return
        f.write(b"PK\x03\x04 half a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_mid_save_removes_the_partial_file_and_says_which_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    folder = tmp_path / "ckpt"
    _crash_at_save(monkeypatch, 3, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match=r"step-00000003\.pt failed: No space left") as failed:
        _fit(callbacks=[Checkpoint(folder, every=1, keep=5)])
    monkeypatch.undo()
    assert failed.value.errno == errno.ENOSPC
    assert _names(folder) == ["latest", "step-00000001.pt", "step-00000002.pt"]  # no temporary
    assert json.loads((folder / "latest").read_text())["checkpoint"] == "step-00000002.pt"
    assert checkpoint.load(folder).position.steps == 2


def test_latest_may_only_name_a_checkpoint_of_its_own_folder(tmp_path: Path) -> None:
    folder, outside = tmp_path / "ckpt", tmp_path / "outside"
    _fit(max_steps=2, callbacks=[Checkpoint(folder, every=2)])
    outside.mkdir()
    (folder / "step-00000002.pt").rename(outside / "step-00000002.pt")
    run_id = json.loads((folder / "latest").read_text())["run_id"]
    for name in ("../outside/step-00000002.pt", str(outside / "step-00000002.pt"), "notes"):
        (folder / "latest").write_text(json.dumps({"checkpoint": name, "run_id": run_id}))
        with pytest.raises(ConfigError, match="not a checkpoint of"):
            _fit(resume=folder)
    # a link of the right name that leads out of the folder
    (folder / "latest").write_text(json.dumps({"checkpoint": "step-00000002.pt", "run_id": run_id}))
    (folder / "step-00000002.pt").symlink_to(outside / "step-00000002.pt")
    with pytest.raises(ConfigError, match="not a checkpoint of"):
        _fit(resume=folder)
    (folder / "latest").unlink()
    with pytest.raises(ConfigError, match=r"symbolic link .* outside"):
        _fit(resume=folder)
    # a symlinked pointer is refused too
    (folder / "step-00000002.pt").unlink()
    (folder / "elsewhere").write_text(json.dumps({"checkpoint": "step-00000002.pt", "run_id": ""}))
    (folder / "latest").symlink_to(folder / "elsewhere")
    with pytest.raises(ConfigError, match="symbolic link"):
        _fit(resume=folder)


def test_a_folder_resumes_from_its_newest_readable_checkpoint(tmp_path: Path) -> None:
    """A truncated, a garbage and a wrongly built newest checkpoint, and a directory of a
    checkpoint's name, are passed over with a warning naming each; named explicitly, a damaged
    file is an error."""
    folder = tmp_path / "ckpt"
    _fit(max_steps=4, callbacks=[Checkpoint(folder, every=2, keep=5)])
    good = (folder / "step-00000004.pt").read_bytes()
    (folder / "step-00000004.pt").write_bytes(good[: len(good) // 2])  # truncated
    (folder / "step-00000005.pt").write_bytes(b"garbage")
    (folder / "step-00000006.pt").mkdir()
    raw = torch.load(folder / "step-00000002.pt", weights_only=True)
    del raw["position"]
    torch.save(raw, folder / "step-00000007.pt")
    run_id = json.loads((folder / "latest").read_text())["run_id"]
    (folder / "latest").write_text(json.dumps({"checkpoint": "step-00000007.pt", "run_id": run_id}))
    with pytest.warns(UserWarning, match="resuming from .*step-00000002.pt") as caught:
        result = _fit(resume=folder, max_steps=3)
    said = str(caught[0].message)
    assert "step-00000007.pt is damaged or no autoaccum checkpoint: position is missing" in said
    assert "step-00000005.pt is not a readable" in said
    assert "step-00000004.pt is not a readable" in said
    assert len(result.losses) == 3
    for name in ("step-00000004.pt", "step-00000005.pt", "step-00000007.pt"):
        with pytest.raises(ConfigError, match=name):
            _fit(resume=folder / name)
    only_damaged = tmp_path / "damaged"
    only_damaged.mkdir()
    (only_damaged / "step-00000001.pt").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="no readable checkpoint in"):
        _fit(resume=only_damaged)


def test_resume_auto_continues_if_there_is_a_checkpoint_and_starts_fresh_if_not(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "ckpt"
    with pytest.warns(UserWarning, match="no checkpoint in .* yet, so this is a new run"):
        first = _fit(max_steps=3, resume="auto", callbacks=[Checkpoint(folder, every=1)])
    assert first.optimizer_steps == 3
    model = mlp()
    with pytest.warns(UserWarning, match=r"continuing from .*step-00000003.pt \(after step 3\)"):
        resumed = _fit(model, max_steps=5, resume="auto", callbacks=[Checkpoint(folder, every=1)])
    straight = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no resume: nothing to say
        expected = _fit(straight, max_steps=5)
    assert resumed.losses == expected.losses
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), straight.parameters(), strict=True)
    )


def test_resume_auto_needs_one_checkpoint_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="callbacks holds no Checkpoint"):
        _fit(resume="auto")
    two = [Checkpoint(tmp_path / "a", every=1), Checkpoint(tmp_path / "b", every=5)]
    with pytest.raises(ConfigError, match="write to 2 folders"):
        _fit(resume="auto", callbacks=two)


def test_a_checkpoint_of_another_run_is_refused_with_what_to_do(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    _fit(callbacks=[Checkpoint(folder, every=5)])
    model = mlp()
    with pytest.raises(ConfigError, match=r"target_batch=8 at step 5, where this run's target is"):
        autoaccum.fit(model, DataLoader(samples(40)), 16, loss_fn=ce, device="cpu", resume=folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no checkpoint in"):
        _fit(resume=empty)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable autoaccum checkpoint"):
        _fit(resume=tmp_path / "junk.pt")
