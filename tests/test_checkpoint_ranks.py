"""Checkpoints on 2 gloo ranks, launched the way users do (torchrun): FSDP2's full state is
gathered into one file and sharded again on resume, exactly, with and without optimizer state;
one run id on every rank; resume="auto" said once; a folder rank 0 cannot write ends every
rank promptly. (DDP's exact 2-rank resume is tests/test_distributed.py's.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("distributed")]

TESTS = Path(__file__).parent
TIMEOUT = 180  # seconds for the whole launch; a collective gives up after 30


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each rank of one launch of checkpoint_ranks_job.py saved."""
    tmp_path = tmp_path_factory.mktemp("ranks")
    env = {
        **os.environ,
        "PYTHONPATH": f"{TESTS}{os.pathsep}{TESTS.parent}",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
        *(str(TESTS / "checkpoint_ranks_job.py"), str(tmp_path)),
    ]
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"the 2-rank launch did not end in {TIMEOUT} s:\n{hung.stdout}\n{hung.stderr}")
    assert done.returncode == 0, done.stdout + done.stderr
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]


def test_fsdp2_resumes_bit_identical_with_and_without_optimizer_state(
    ranks: list[dict[str, Any]],
) -> None:
    for result in ranks:
        for name in ("sgd", "adamw"):
            straight, resumed = result[name]["straight"], result[name]["resumed"]
            assert all(torch.equal(p, q) for p, q in zip(straight, resumed, strict=True)), name


def test_one_run_id_on_every_rank_and_resume_auto_said_once(ranks: list[dict[str, Any]]) -> None:
    plain = [result["plain"] for result in ranks]
    assert plain[0]["run_id"] == plain[1]["run_id"]
    assert len(plain[0]["told"]) == 1
    assert "this is a new run" in plain[0]["told"][0]
    assert plain[1]["told"] == []


def test_a_folder_rank_0_cannot_write_stops_every_rank_before_training(
    ranks: list[dict[str, Any]],
) -> None:
    errors = [result["plain"]["error"] for result in ranks]
    assert [e[0] for e in errors] == ["ConfigError", "DistributedError"]
    assert "cannot write checkpoints to" in errors[0][1]
    assert "rank 0: ConfigError: cannot write checkpoints" in errors[1][1]
    assert all(e[2] < 15 for e in errors)
