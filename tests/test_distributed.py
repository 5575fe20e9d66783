"""Real torch.distributed, 2 processes on gloo: fit on 2 ranks equals 1-process full-window SGD.

Every test launches ``tests/dist_workers/worker.py`` twice (rank 0 and 1) as
subprocesses and compares what they saved with a single-process float64 reference
built here. ``*_env`` scenarios give the workers torchrun's variables (MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK) and let ``fit`` create the process group
itself; the others initialise it in the worker (30 s collective timeout). A hang
fails the test at ``TIMEOUT`` seconds, and a failing rank's output is shown.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_workers.common import WORLD
from helpers import mlp
from reference import (
    ce,
    reference,
    rel_diff,
    samples,
    token_ce,
    token_model,
    tokens,
    windows_of,
)

# one worker runs the module: its scenarios share launches (a module-scoped fixture)
pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("distributed")]

WORKER = Path(__file__).parent / "dist_workers" / "worker.py"
TIMEOUT = 240.0  # seconds for a whole 2-process launch (a suite of scenarios); collectives: 30
TOL = 1e-10
_TORCHRUN_VARS = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "TORCHELASTIC_RUN_ID",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _logs(logs: list[Path]) -> str:
    return "\n".join(
        f"----- rank {rank} -----\n{path.read_text(errors='replace')}"
        for rank, path in enumerate(logs)
    )


def launch(scenario: str, tmp_path: Path) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``WORLD`` worker processes; what each rank saved, in rank order."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs, logs = [], []
    for rank in range(WORLD):
        rank_env = dict(env)
        if scenario.split("+")[0].endswith("_env"):
            rank_env.update(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                RANK=str(rank),
                WORLD_SIZE=str(WORLD),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(WORLD),
            )
        log = tmp_path / f"rank{rank}.log"
        logs.append(log)
        with log.open("w") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), scenario, str(rank), str(port), str(tmp_path)],
                    env=rank_env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + TIMEOUT
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = now  # let the others report their side for a moment, then stop them
        if now > deadline or (failed_at is not None and now - failed_at > 5):
            break
        time.sleep(0.05)
    hung = [rank for rank, p in enumerate(procs) if p.poll() is None]
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if hung and failed_at is None:
        pytest.fail(
            f"{scenario}: ranks {hung} still running after {TIMEOUT:.0f}s (a hang)\n" + _logs(logs)
        )
    if any(codes):
        pytest.fail(f"{scenario}: worker exit codes {codes}\n" + _logs(logs))
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


#: Scenarios that share one pair of worker processes (one start, one process group), run in
#: this order; the env ones let fit create and destroy the group, one after the other.
SUITES = {
    "own_group": (
        "tokens",
        "comm_hook",
        "oom_on_rank0",
        "rank_local",
        "fsdp2",
        "oom_recovery",
        "failures",
        "callback_faults",
    ),
    "env": ("samples_env", "plan_error_env", "failure_env"),
}


@pytest.fixture(scope="module")
def suites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every suite's scenarios, launched once for the module: what each rank saved, by name."""
    outs: dict[str, list[dict[str, Any]]] = {}
    for suite, names in SUITES.items():
        ranks = launch("+".join(names), tmp_path_factory.mktemp(suite))
        for name in names:
            outs[name] = [rank_out[name] for rank_out in ranks]
    return outs


def assert_exact(outs: list[dict[str, Any]], ref: torch.nn.Module, ref_losses: list[float]) -> None:
    for rank, out in enumerate(outs):
        assert rel_diff(out["params"], ref) < TOL, f"rank {rank} parameters differ"
        assert out["losses"] == pytest.approx(ref_losses, rel=1e-12), f"rank {rank} losses"
        assert out["optimizer_steps"] == len(ref_losses)
        assert out["world_size"] == WORLD


def test_two_ranks_equal_one_process_full_window_sgd(
    suites: dict[str, list[dict[str, Any]]],
) -> None:
    """fit's own init from torchrun's variables; uneven micro sizes and a short last window."""
    outs = suites["samples_env"]
    data = samples(26)
    ref = mlp()
    ref_losses = reference(ref, windows_of(data, 10), ce)
    assert len(ref_losses) == 3
    assert len(windows_of(data, 10)[-1][0]) == 6  # a short last window
    assert_exact(outs, ref, ref_losses)
    for out in outs:
        assert out["micro_sizes"] == (2, 2, 1)  # 5 per rank, max_micro 2
        assert out["samples_seen"] == 26  # global, not per rank
        assert out["group_left_behind"] is False  # fit destroyed the group it created


def test_token_weighted_ranks_with_different_token_counts(
    suites: dict[str, list[dict[str, Any]]],
) -> None:
    data = tokens(30)
    ref = token_model()
    ref_losses = reference(ref, windows_of(data, 14), token_ce)
    # DistributedSampler(shuffle=False) gives rank r the samples r, r+2, …: in window 0
    # the two ranks carry different numbers of target tokens, so a per-rank mean is wrong.
    targets = (data.tensors[1][:14] != -100).sum(dim=1)
    assert int(targets[0::2].sum()) != int(targets[1::2].sum())
    outs = suites["tokens"]
    assert_exact(outs, ref, ref_losses)
    for out in outs:
        assert out["micro_sizes"] == (4, 3)  # 7 per rank; the last window is 1 per rank
        assert out["samples_seen"] == 30


def test_gradients_all_reduced_once_per_window_on_the_last_micro_step(
    suites: dict[str, list[dict[str, Any]]],
) -> None:
    """A comm hook on a DDP model wrapped by the caller sees one reduction per window."""
    outs = suites["comm_hook"]
    data = samples(28)
    ref = mlp()
    ref_losses = reference(ref, windows_of(data, 12), ce)
    assert_exact(outs, ref, ref_losses)
    for out in outs:
        # 14 samples per rank: windows of 6 (2+2+2) and a short last one of 2 (one micro-step);
        # each window: the all-reduce fires during the last forward/backward, then the step.
        assert out["windows"] == [
            [("all_reduce", 3), ("step", 3)],
            [("all_reduce", 3), ("step", 3)],
            [("all_reduce", 1), ("step", 1)],
        ]


def test_oom_on_one_rank_is_agreed_by_all_ranks(suites: dict[str, list[dict[str, Any]]]) -> None:
    outs = suites["oom_on_rank0"]
    for key, lower in (("probe", [(1, True)]), ("bn", [])):  # BatchNorm: never below 2
        probes = [out["probe"] if key == "probe" else out["bn"]["probe"] for out in outs]
        sizes = [[(t["size"], t["passed"]) for t in probe["trials"]] for probe in probes]
        assert sizes[0] == sizes[1] == [*lower, (2, True), (4, False), (3, True)], key
        failures = [{t["size"]: t["failure"] for t in probe["trials"]}[4] for probe in probes]
        assert failures == ["oom", "oom (another rank)"], key
        for probe in probes:
            assert (probe["largest_pass"], probe["max_micro"]) == (3, 2)  # 3 less the margin
    data = samples(32)
    ref = mlp()
    ref_losses = reference(ref, windows_of(data, 16), ce)
    assert_exact(outs, ref, ref_losses)
    for out in outs:
        assert out["micro_sizes"] == (2, 2, 2, 2)
        assert out["bn"]["micro_sizes"] == (2, 2, 2, 2)
        assert out["bn"]["optimizer_steps"] == 2


def test_target_not_divisible_by_world_size_fails_on_every_rank(
    suites: dict[str, list[dict[str, Any]]],
) -> None:
    outs = suites["plan_error_env"]
    for out in outs:
        assert "target_batch 15 does not divide evenly among 2 ranks" in out["error"]
        assert "14 or 16" in out["error"]
        assert out["group_left_behind"] is False


def test_rank_local_data_stops_when_the_first_rank_runs_out(
    suites: dict[str, list[dict[str, Any]]],
) -> None:
    """Lists of batches are rank-local: the ranks agree on every window and on the end."""
    outs = suites["rank_local"]
    mine, theirs = samples(20), samples(14, seed=1)
    # global window k: rank 0's samples 5k..5k+4 and rank 1's; rank 1 runs out after 3
    windows = [
        tuple(
            torch.cat([a[5 * k : 5 * k + 5], b[5 * k : 5 * k + 5]])
            for a, b in zip(mine.tensors, theirs.tensors, strict=True)
        )
        for k in range(3)
    ]
    ref = mlp()
    ref_losses = reference(ref, windows, ce)
    assert_exact(outs, ref, ref_losses)
    assert [out["samples_seen"] for out in outs] == [29, 29]  # 10 + 10 + (5 + 4)


def test_fsdp2_fully_shard_trains_exactly_with_one_reduce_scatter_per_window(
    suites: dict[str, list[dict[str, Any]]],
) -> None:
    """An already fully_shard-ed model (two FSDP groups), probed, then trained."""
    outs = suites["fsdp2"]
    data = samples(26)
    ref = mlp()
    ref_losses = reference(ref, windows_of(data, 10), ce)
    assert_exact(outs, ref, ref_losses)
    for out in outs:
        trials = [(t["size"], t["passed"]) for t in out["probe"]["trials"]]
        assert trials == [(1, True), (2, True), (4, False), (3, True)]
        assert out["micro_sizes"] == (3, 2)  # 5 per rank, 3 found (margin 0)
        # the trials' optimizer steps never reach the user's step hooks: three steps seen
        w0, w1, w2 = out["windows"]
        # sync off for the first micro-step; one reduce-scatter per FSDP group at the last
        full = [("sync=False", 0), ("sync=True", 1), ("reduce_scatter", 2), ("reduce_scatter", 2)]
        assert w1 == [*full, ("step", 2)]
        # w0 also holds the trials' events (their forwards counted): none reduced gradients
        trials, first = w0[:-5], w0[-5:]
        assert trials
        assert not [e for e in trials if e[0] == "reduce_scatter"]
        assert [e[0] for e in first] == [e[0] for e in full] + ["step"]
        assert w2 == [("reduce_scatter", 1), ("reduce_scatter", 1), ("step", 1)]  # 3 = (3,)
        assert "windows have 2 to 3 micro-batches" in out["uneven_error"]
        # AdamW's two moments, sharded: the trials allocated them although nothing reduced
        assert out["probe_fixed"]["optimizer_state"] >= out["probe_fixed"]["parameters"]
        assert out["adam_state_after_probe"] == 0  # and the probe put the optimizer back


def test_an_oom_on_one_rank_or_both_is_rerun_smaller_on_every_rank_exactly(
    suites: dict[str, list[dict[str, Any]]],
) -> None:
    """At a forward, in the last micro-step's backward, on both ranks at once, twice in one
    window: the window is dropped on every rank and re-run smaller; every sample counts
    once (the float64 parameters land on full-window SGD's), and nothing hangs."""
    from dist_workers.worker import OOM_CASES

    outs = suites["oom_recovery"]
    data = samples(48)
    ref = mlp()
    ref_losses = reference(ref, windows_of(data, 16), ce)
    for name in OOM_CASES:
        cases = [out[name] for out in outs]
        assert_exact(cases, ref, ref_losses)
        for case in cases:
            assert case["samples_seen"] == 48, name
            expected = 2 if name == "same_window_twice" else 1
            assert case["oom_retries"] == expected, name
            assert case["resizes"][0][1:] == (4, 3, "oom"), name  # 8 per rank: 4+4 → 3+3+2
        assert cases[0]["resizes"] == cases[1]["resizes"], name  # every rank changed alike


def test_a_failure_one_rank_cannot_recover_stops_every_rank_without_waiting(
    suites: dict[str, list[dict[str, Any]]],
) -> None:
    outs = suites["failures"]
    kind0, message0, seconds0 = outs[0]["optimizer"]
    kind1, _, seconds1 = outs[1]["optimizer"]
    assert kind1 == "OutOfMemoryError"  # the failing rank raises its own error
    assert kind0 == "DistributedError"  # the other learns what happened, and where
    assert "rank 1: OutOfMemoryError" in message0
    assert "the optimizer update of optimizer step 2" in message0
    assert max(seconds0, seconds1) < 15  # not the 30 s collective timeout
    kinds = [out["loss_fn"][0] for out in outs]
    assert kinds == ["DistributedError", "ValueError"]
    assert "rank 1: ValueError: a corrupt sample in the data" in outs[0]["loss_fn"][1]
    assert max(out["loss_fn"][2] for out in outs) < 15


def test_without_a_supervisor_one_ranks_error_ends_every_rank(
    suites: dict[str, list[dict[str, Any]]],
) -> None:
    """fit made the group from torchrun's variables, nothing kills the healthy rank: it must
    stop by itself, promptly, and both ranks leave no group behind."""
    outs = suites["failure_env"]
    assert [out["error"][0] for out in outs] == ["DistributedError", "RuntimeError"]
    assert all(out["error"][2] < 15 for out in outs)
    assert not any(out["group_left_behind"] for out in outs)


def test_two_ranks_resume_bit_identical_to_the_run_that_never_stopped(tmp_path: Path) -> None:
    """2 gloo ranks, a shuffled DataLoader sharded by autoaccum, token-weighted losses,
    dropout, AdamW: stopped after 3 of 7 steps, resumed by new processes."""
    first = launch("resume_first", tmp_path)
    second = launch("resume_second", tmp_path)
    for rank in range(WORLD):
        straight = first[rank]["straight"]
        assert second[rank]["losses"] == straight["losses"]
        for p, q in zip(second[rank]["params"], straight["params"], strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("case", "kinds", "says"),
    [
        (
            "fault_then_checkpoint",
            ["DistributedError", "ValueError"],
            "rank 1: ValueError: a bug in rank 1's callback",
        ),
        (
            "fault_then_evaluate",
            ["DistributedError", "ValueError"],
            "rank 1: ValueError: a bug in rank 1's callback",
        ),
        (
            "fault_in_evaluation",
            ["DistributedError", "ValueError"],
            "rank 1: ValueError: a bug in rank 1's evaluation",
        ),
        (
            "save_on_rank0_only",
            ["DistributedError", "DistributedError"],
            "rank 0 was saving a checkpoint; rank 1 was the stop check",
        ),
        (
            "targets_differ",
            ["DistributedError", "DistributedError"],
            "different settings (target_batch: rank 0 8, rank 1 12)",
        ),
        (
            "datasets_differ",
            ["DistributedError", "DistributedError"],
            "datasets of different lengths (rank 0: 40, rank 1: 32)",
        ),
    ],
)
def test_what_parts_the_ranks_stops_every_rank_with_what_happened(
    suites: dict[str, list[dict[str, Any]]], case: str, kinds: list[str], says: str
) -> None:
    """A callback failing on one rank while the other saves a checkpoint or evaluates, a save
    on rank 0 only, different targets or datasets per rank: every rank ends with an error
    (the healthy one says what happened where), well inside the 30 s collective timeout."""
    outs = [out[case] for out in suites["callback_faults"]]
    assert [kind for kind, _, _ in outs] == kinds
    distributed = [message for kind, message, _ in outs if kind == "DistributedError"]
    assert all(says in message for message in distributed), distributed
    assert max(seconds for _, _, seconds in outs) < 15
