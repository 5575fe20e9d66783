"""The same run on any number of ranks (issue 22), under real torchrun on gloo, float64.

A DataLoader's epoch order is the one the user's loader draws in one process, global window k
is samples k·T … (k+1)·T − 1 of it whatever the world size, each rank reads its share (ranks
may hold one sample more or less; none is repeated), so 1, 2 and 3 ranks land on the same
parameters (only the reduction's summation order differs). A checkpoint taken on N ranks
resumes on M. Each rank plans under its own ceiling. ``tests/world_size_job.py`` runs the jobs;
one launch per world size and phase.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from launch import run

pytestmark = pytest.mark.distributed

JOB = Path(__file__).parent / "world_size_job.py"
BOUND = 240.0  #: seconds for one launch before it counts as a hang
TOL = 1e-12
#: (world size, jobs), in order: a checkpoint is resumed by a later launch on another world size
LAUNCHES: tuple[tuple[int, tuple[str, ...]], ...] = (
    (3, ("loader", "shuffled", "straight", "stopped", "tokens")),
    (
        2,
        (
            "loader",
            "shuffled",
            "order3",
            "order4",
            "straight",
            "stopped",
            "resume3",
            "own_micro",
            "own_probe",
            "tokens",
        ),
    ),
    (3, ("resume2",)),
    (
        1,
        (
            "loader",
            "shuffled",
            "order3",
            "order4",
            "straight",
            "resume2",
            "resume3",
            "own_micro",
            "tokens",
        ),
    ),
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("world_size")
    for world, jobs in LAUNCHES:
        if world == 1:  # one plain process, as a user runs it
            done = subprocess.run(
                [sys.executable, str(JOB), str(folder), *jobs],
                capture_output=True,
                text=True,
                timeout=BOUND,
                env={"OMP_NUM_THREADS": "1", "PATH": ""},
            )
            assert done.returncode == 0, done.stdout + done.stderr
        else:
            run(JOB, str(folder), *jobs, folder=folder, bound=BOUND, nproc=world)
    return folder


def load(folder: Path, job: str, world: int, rank: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = torch.load(folder / f"{job}-w{world}-rank{rank}.pt", weights_only=False)
    return out


def rel(params: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    num = sum(float((p - q).norm() ** 2) for p, q in zip(params, ref, strict=True))
    return math.sqrt(num / sum(float(q.norm() ** 2) for q in ref))


@pytest.mark.parametrize("job", ["loader", "shuffled"])
def test_one_two_and_three_ranks_land_on_the_same_parameters(saved: Path, job: str) -> None:
    """37 token sequences (dividing neither the target 10 nor 2 or 3 ranks), token-weighted,
    2 epochs, in order or shuffled: every rank of every world size ends on the one-process
    parameters, and every sample counted once per epoch."""
    one = load(saved, job, 1)
    assert one["samples_seen"] == 74
    for world in (2, 3):
        for rank in range(world):
            out = load(saved, job, world, rank)
            assert rel(out["params"], one["params"]) < TOL, (world, rank)
            assert out["losses"] == pytest.approx(one["losses"], rel=1e-12, abs=1e-14)
            assert out["samples_seen"] == 74  # 2 × 37: none padded, none twice
    assert load(saved, job, 3)["describe"] == (
        "target_batch 10 = rank 0: 2 × 2, rank 1: 3 × 1, rank 2: 3 × 1"
    )


def test_the_order_is_the_users_seed_not_the_world_size(saved: Path) -> None:
    """The ranks read the one-process order of the user's seed, window by window: the same
    seed gives the same order on 2 ranks as in one process; another seed another order."""
    for seed in (3, 4):
        one = load(saved, f"order{seed}", 1)["order"]
        ranks = [load(saved, f"order{seed}", 2, r)["order"] for r in (0, 1)]
        merged = [i for k in range(4) for r in (0, 1) for i in ranks[r][5 * k : 5 * k + 5]]
        assert merged == one
        assert sorted(one) == sorted(set(one))  # 4 windows of 10: no sample twice
    assert load(saved, "order3", 1)["order"] != load(saved, "order4", 1)["order"]


@pytest.mark.parametrize(
    ("taken_on", "resumed_on"), [(2, 3), (2, 1), (3, 2), (3, 1)], ids=lambda w: f"{w}"
)
def test_a_checkpoint_resumes_exactly_on_another_world_size(
    saved: Path, taken_on: int, resumed_on: int
) -> None:
    """Stopped after 3 of 7 steps on ``taken_on`` ranks (shuffled, 2 epochs), resumed to 7 on
    ``resumed_on``: the parameters of the straight run, whatever both world sizes."""
    straight = load(saved, "straight", taken_on)
    for rank in range(resumed_on):
        resumed = load(saved, f"resume{taken_on}", resumed_on, rank)
        assert resumed["steps"] == 7
        assert rel(resumed["params"], straight["params"]) < TOL, rank
        assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-12, abs=1e-14)


def test_each_rank_plans_under_its_own_ceiling_and_trains_exactly(saved: Path) -> None:
    """max_micro 3 on rank 0 and 5 on rank 1 (given, or found by each rank's own probe): each
    rank splits its share its own way, the step is the one-process step, and the plan says
    every rank's split."""
    one = load(saved, "own_micro", 1)
    for job in ("own_micro", "own_probe"):
        outs = [load(saved, job, 2, r) for r in (0, 1)]
        assert [o["micro_sizes"] for o in outs] == [(3, 2), (5,)]
        for out in outs:
            assert rel(out["params"], one["params"]) < TOL, job
            assert out["rank_sizes"] == ((3, 2), (5,))
            assert out["describe"] == "target_batch 10 = rank 0: 3+2, rank 1: 5 × 1"
    assert [load(saved, "own_probe", 2, r)["max_micro"] for r in (0, 1)] == [3, 5]


def test_a_token_budget_is_the_same_on_one_two_and_three_ranks(saved: Path) -> None:
    """20 loss tokens a step (a row split where a window ends inside it), the ranks sharing
    each window's tokens as evenly as its rows allow: every step holds exactly 20 tokens over
    all ranks, and 1, 2 and 3 ranks land on the same parameters."""
    one = load(saved, "tokens", 1)
    assert one["items"][:7] == [20.0 * k for k in range(1, 8)]
    for world in (2, 3):
        for rank in range(world):
            out = load(saved, "tokens", world, rank)
            assert out["items"] == one["items"], (world, rank)
            assert rel(out["params"], one["params"]) < TOL, (world, rank)
