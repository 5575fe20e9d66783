"""Checkpoints and the exact resume: N steps straight equal k steps, a stop, and a new process
resuming the other N − k, bit for bit; atomic files; a checkpoint of another run refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import mlp
from reference import ce, samples
from resume_job import job
from torch.utils.data import DataLoader

import autoaccum
from autoaccum import ConfigError
from autoaccum.probing.state import RngState
from autoaccum.train import checkpoint
from autoaccum.train.callbacks import Checkpoint

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


def test_resuming_without_the_random_state_would_not_be_exact(
    runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Negative control: continuing from the weights and optimizer alone (another random
    state) ends elsewhere."""
    straight, first = runs
    saved = checkpoint.load(first / "ckpt")
    torch.manual_seed(999)  # as if the random state had not been saved: any other state
    for state in saved["random"]:
        state["now"] = RngState.capture()
    altered = tmp_path / "altered"
    altered.mkdir()
    torch.save(saved, altered / "step-00000005.pt")
    resumed = resume_in_a_new_process(tmp_path / "resumed", 9, altered)
    expected = torch.load(straight / "result.pt")
    assert any(
        not torch.equal(p, q) for p, q in zip(resumed["params"], expected["params"], strict=True)
    )


def _fit(**kwargs: Any) -> autoaccum.FitResult:
    model = mlp()
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


def test_checkpoints_are_atomic_and_only_the_last_k_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "ckpt"
    _fit(callbacks=[Checkpoint(folder, every=1, keep=2)])
    assert sorted(p.name for p in folder.glob("step-*.pt")) == [
        "step-00000004.pt",
        "step-00000005.pt",
    ]
    assert (folder / "latest").read_text() == "step-00000005.pt"
    before = (folder / "step-00000005.pt").read_bytes()

    real_save = torch.save

    def crash(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, f, *args, **kwargs)
        raise OSError("disk full (injected, after the bytes were written)")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        _fit(callbacks=[Checkpoint(folder, every=1, keep=2)])
    monkeypatch.undo()
    # the crashed write left a temporary file at most: the pointer and its file are intact
    assert (folder / "latest").read_text() == "step-00000005.pt"
    assert (folder / "step-00000005.pt").read_bytes() == before
    assert checkpoint.load(folder)["position"].steps == 5
    _fit(callbacks=[Checkpoint(folder, every=1, keep=2)])
    assert not list(folder.glob(".*.tmp-*"))  # the next save clears what a crash left


def test_a_checkpoint_of_another_run_is_refused_with_what_to_do(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    _fit(callbacks=[Checkpoint(folder, every=5)])
    model = mlp()
    with pytest.raises(ConfigError, match="taken with target_batch=8, this run asks for 16"):
        autoaccum.fit(model, DataLoader(samples(40)), 16, loss_fn=ce, device="cpu", resume=folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no checkpoint in"):
        _fit(resume=empty)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable autoaccum checkpoint"):
        _fit(resume=tmp_path / "junk.pt")
