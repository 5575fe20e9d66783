"""Real torch.distributed, 2 processes on gloo, launched by torchrun as users launch: fit on
2 ranks equals 1-process full-window SGD.

One launch of ``tests/dist_workers/worker.py`` (``torchrun --standalone --nproc-per-node=2``)
runs every scenario in turn, so the imports are paid once: first those that initialise their
own group, then those in which ``fit`` makes the group from torchrun's variables and keeps it
for the fits that follow (:mod:`dist_workers.fit_group`). The tests compare what the ranks
saved with a single-process float64 reference built here. A launch that runs past ``BOUND``
fails with each rank's stack (:mod:`launch`).
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_workers.common import WORLD
from dist_workers.fit_group import ENV_TIMEOUT, MISSING_TIMEOUT
from dist_workers.worker import TIMEOUT
from helpers import mlp
from launch import run
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
from torch.utils.data import DataLoader

import autoaccum
from autoaccum import distributed as D
from autoaccum.errors import DistributedError
from autoaccum.rendezvous import connect_bound

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).parent / "dist_workers" / "worker.py"
BOUND = 300.0  #: seconds for one launch (a suite of scenarios) before it counts as a hang
TOL = 1e-10

#: Every scenario, in the order one pair of processes runs them: those in a group of their
#: own first, then those in which fit makes the group (``*_env``), the first resume half too.
SUITE = (
    "tokens",
    "comm_hook",
    "oom_on_rank0",
    "rank_local",
    "fsdp2",
    "oom_recovery",
    "failures",
    "callback_faults",
    "resume_first",
    "samples_env",
    "plan_error_env",
    "failure_env",
    "more_fits_env",
    "rejoin_env",
    "init_failure_env",
    "missing_rank_env",
)


def launch(scenarios: tuple[str, ...], folder: Path) -> list[dict[str, Any]]:
    """Run ``scenarios`` on ``WORLD`` ranks under torchrun; what each rank saved, in rank
    order (each rank's file holds one entry per scenario)."""
    run(WORKER, "+".join(scenarios), str(folder), folder=folder, bound=BOUND, nproc=WORLD)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def suite_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("suite")


@pytest.fixture(scope="module")
def suites(suite_folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Every scenario, launched once for the module: what each rank saved, by name."""
    ranks = launch(SUITE, suite_folder)
    return {name: [rank_out[name] for rank_out in ranks] for name in SUITE}


def assert_exact(outs: list[dict[str, Any]], ref: torch.nn.Module, ref_losses: list[float]) -> None:
    for rank, out in enumerate(outs):
        assert rel_diff(out["params"], ref) < TOL, f"rank {rank} parameters differ"
        assert out["losses"] == pytest.approx(ref_losses, rel=1e-12), f"rank {rank} losses"
        assert out["optimizer_steps"] == len(ref_losses)
        assert out["world_size"] == WORLD


def test_two_ranks_equal_one_process_full_window_sgd(
    suites: dict[str, list[dict[str, Any]]],
) -> None:
    """fit's own group from torchrun's variables; uneven micro sizes and a short last window."""
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
        assert out["group_kept"] is True  # for the fits that follow in this process
        assert out["collective_timeout"] == ENV_TIMEOUT  # fit's timeout, not the connect bound


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


def test_each_rank_probes_its_own_device_and_plans_under_its_own_ceiling(
    suites: dict[str, list[dict[str, Any]]],
) -> None:
    """Rank 0 runs out of memory above 3 samples, rank 1 never: under deferred sync a
    micro-step runs no collective, so each rank probes alone (its trials, its ceiling) and
    splits its share its own way; the step stays the one-process step. With a BatchNorm too
    (no trial below 2, no DDP buffer broadcast inside a trial)."""
    outs = suites["oom_on_rank0"]
    for key in ("probe", "bn"):
        probes = [out["probe"] if key == "probe" else out["bn"]["probe"] for out in outs]
        tried = [[(t["size"], t["passed"]) for t in probe["trials"]] for probe in probes]
        assert (4, False) in tried[0], key
        assert (3, True) in tried[0], key
        assert all(passed for _, passed in tried[1]), key  # rank 1 never ran out
        assert min(size for size, _ in tried[0] + tried[1]) == (2 if key == "bn" else 1), key
        assert {t["size"]: t["failure"] for t in probes[0]["trials"]}[4] == "oom", key
        assert (probes[0]["largest_pass"], probes[0]["max_micro"]) == (3, 2)  # less the margin
        assert (probes[1]["largest_pass"], probes[1]["max_micro"]) == (8, 8)
    data = samples(32)
    ref = mlp()
    ref_losses = reference(ref, windows_of(data, 16), ce)
    assert_exact(outs, ref, ref_losses)
    assert [out["micro_sizes"] for out in outs] == [(2, 2, 2, 2), (8,)]
    assert [out["bn"]["micro_sizes"] for out in outs] == [(2, 2, 2, 2), (8,)]
    assert outs[0]["bn"]["optimizer_steps"] == 2


def test_a_target_leaving_a_rank_without_samples_fails_on_every_rank(
    suites: dict[str, list[dict[str, Any]]],
) -> None:
    outs = suites["plan_error_env"]
    for out in outs:
        assert "target_batch 1 shared among 2 ranks leaves a rank no sample" in out["error"]
        assert "use target_batch ≥ 2" in out["error"]
        assert out["same_group"] is True  # the group the first fit made, reused


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
    # rank-local data, 15 and 13 samples: the last window has 3 micro-steps on rank 0 and 2
    # on rank 1, which runs a third that adds nothing; exact
    mine, theirs = samples(15), samples(13, seed=1)
    uneven = [
        tuple(
            torch.cat([a[5 * k : 5 * k + 5], b[5 * k : 5 * k + 5]])
            for a, b in zip(mine.tensors, theirs.tensors, strict=True)
        )
        for k in range(3)
    ]
    uneven_ref = mlp()
    assert_exact([out["uneven"] for out in outs], uneven_ref, reference(uneven_ref, uneven, ce))
    for out in outs:
        # AdamW's two moments, sharded: the trials allocated them although nothing reduced
        assert out["probe_fixed"]["optimizer_state"] >= out["probe_fixed"]["parameters"]
        assert out["adam_state_after_probe"] == 0  # and the probe put the optimizer back


def test_an_oom_on_one_rank_or_both_is_rerun_on_every_rank_exactly(
    suites: dict[str, list[dict[str, Any]]],
) -> None:
    """At a forward, in the last micro-step's backward, on both ranks at once, twice in one
    window: the window is dropped on every rank and re-run, smaller on the ranks that ran
    out; every sample counts once (the float64 parameters land on full-window SGD's), and
    nothing hangs."""
    from dist_workers.worker import OOM_CASES

    outs = suites["oom_recovery"]
    data = samples(48)
    ref = mlp()
    ref_losses = reference(ref, windows_of(data, 16), ce)
    for name in OOM_CASES:
        cases = [out[name] for out in outs]
        assert_exact(cases, ref, ref_losses)
        f0, f1, b0, b1 = OOM_CASES[name]
        for rank, case in enumerate(cases):
            assert case["samples_seen"] == 48, name
            ran_out = bool((f0 + b0) if rank == 0 else (f1 + b1))
            expected = 2 if name == "same_window_twice" else 1
            assert case["oom_retries"] == (expected if ran_out else 0), (name, rank)
            if ran_out:  # 8 per rank: 4+4 → 3+3+2 on the rank that ran out, only
                assert case["resizes"][0][1:] == (4, 3, "oom"), name
            else:
                assert case["resizes"] == [], (name, rank)


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
    prompt = TIMEOUT.total_seconds() / 2  # a rank left waiting would wait the whole timeout
    assert max(seconds0, seconds1) < prompt
    kinds = [out["loss_fn"][0] for out in outs]
    assert kinds == ["DistributedError", "ValueError"]
    assert "rank 1: ValueError: a corrupt sample in the data" in outs[0]["loss_fn"][1]
    assert max(out["loss_fn"][2] for out in outs) < prompt
    # no memory for the deferred reduction on rank 1: told before rank 0 enters a collective
    (kind0, message0, seconds0, kept0), (kind1, _, seconds1, kept1) = (
        out["reduction"] for out in outs
    )
    assert (kind0, kind1) == ("DistributedError", "OutOfMemoryError")
    assert "rank 1: OutOfMemoryError" in message0
    assert "optimizer step 2" in message0
    assert kept0
    assert kept1  # window 2 reached neither rank's weights
    assert max(seconds0, seconds1) < prompt


def test_without_a_supervisor_one_ranks_error_ends_every_rank(
    suites: dict[str, list[dict[str, Any]]],
) -> None:
    """fit made the group from torchrun's variables, nothing kills the healthy rank: it must
    stop by itself, promptly (not after fit's timeout), and the group stays for later fits."""
    outs = suites["failure_env"]
    assert [out["error"][0] for out in outs] == ["DistributedError", "RuntimeError"]
    assert all(out["error"][2] < ENV_TIMEOUT / 2 for out in outs)
    assert all(out["same_group"] for out in outs)


# ------------------------------------------------------------------ fit called several times


def test_later_fits_reuse_the_group_with_other_models_and_targets(
    suites: dict[str, list[dict[str, Any]]],
) -> None:
    """A fourth and fifth fit in the same processes (after a success, a plan error and a
    failure): a token model at target 14, then a probed MLP at 16, each exact."""
    outs = suites["more_fits_env"]
    assert all(out["same_group"] for out in outs)
    tokens_ref = token_model()
    assert_exact(
        [out["tokens"] for out in outs],
        tokens_ref,
        reference(tokens_ref, windows_of(tokens(30), 14), token_ce),
    )
    probed_ref = mlp()
    probed_losses = reference(probed_ref, windows_of(samples(32), 16), ce)
    assert_exact([out["probed"] for out in outs], probed_ref, probed_losses)
    # each rank its own ceiling: rank 0 runs out above 3, rank 1 fits its whole share of 8
    assert [out["probed"]["probe"]["largest_pass"] for out in outs] == [3, 8]


def test_a_group_destroyed_between_fits_is_made_again(
    suites: dict[str, list[dict[str, Any]]],
) -> None:
    """The script destroys the group after a fit; the next fit makes a new one on the same
    torchrun store and trains exactly."""
    outs = suites["rejoin_env"]
    ref = mlp(seed=2)
    assert_exact(outs, ref, reference(ref, windows_of(samples(24), 8), ce))
    assert all(out["new_group"] for out in outs)


@pytest.mark.parametrize("late", [1, 0])
def test_a_rank_that_cannot_connect_stops_every_rank_within_the_connect_bound(
    suites: dict[str, list[dict[str, Any]]], late: int
) -> None:
    """Rank 1's gloo has no network interface: both ranks raise a DistributedError naming
    rank 1's failure, within the connect bound (seconds), not fit's timeout of 120 s, and no
    group is left; the next fit of both ranks trains exactly. Rank 1 late: rank 0 learns it
    while it waits; rank 0 late: it is connecting when rank 1 fails."""
    outs = [out[f"rank{late}_late"] for out in suites["init_failure_env"]]
    bound = connect_bound(WORLD, datetime.timedelta(seconds=120)).total_seconds()
    for rank, out in enumerate(outs):
        message, seconds, group_left = out["error"]
        assert "rank 1: could not connect (gloo): RuntimeError" in message, rank
        assert "no-such-if0" in message, rank
        assert group_left is False
        assert seconds < 1 + bound + 20, rank  # late by 1 s, the bound, slack for a busy machine
    ref = mlp(seed=3)
    ref_losses = reference(ref, windows_of(samples(20), 10), ce)
    assert_exact([out["after"] for out in outs], ref, ref_losses)


def test_a_rank_that_never_comes_is_named_after_fits_timeout(
    suites: dict[str, list[dict[str, Any]]],
) -> None:
    """Rank 1 skips a fit: rank 0 stops after fit's timeout saying rank 1 never came; rank 1,
    late to the set-up rank 0 gave up, stops at once with the same words; then both ranks
    train together again, exactly."""
    outs = suites["missing_rank_env"]
    for out in outs:
        assert (
            "rank 0: ranks [1] did not reach the process group's set-up within 3s"
            in out["error"][0]
        )
    assert MISSING_TIMEOUT <= outs[0]["error"][1] < MISSING_TIMEOUT + 20
    assert outs[1]["error"][1] < MISSING_TIMEOUT / 2  # at once: not after a timeout of its own
    ref = mlp(seed=4)
    assert_exact(
        [out["after"] for out in outs], ref, reference(ref, windows_of(samples(20), 10), ce)
    )


def test_the_group_fit_made_is_destroyed_when_the_process_exits(
    suites: dict[str, list[dict[str, Any]]], suite_folder: Path
) -> None:
    for rank in range(WORLD):
        assert (suite_folder / f"exit{rank}.txt").read_text() == "False"


def test_a_single_process_fit_from_torchruns_variables_keeps_its_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """World size 1 in this process (rank 0 serves the store): two fits, one group."""
    _torchrun_variables(monkeypatch, world_size=1)
    try:
        first = autoaccum.fit(
            mlp(),
            DataLoader(samples(12), batch_size=4),
            4,
            loss_fn=ce,
            max_micro=2,
            device="cpu",
            progress=False,
            report=False,
        )
        group = torch.distributed.group.WORLD
        second = autoaccum.fit(
            mlp(seed=1),
            DataLoader(samples(9), batch_size=3),
            3,
            loss_fn=ce,
            max_micro=3,
            device="cpu",
            progress=False,
            report=False,
        )
        assert torch.distributed.group.WORLD is group
        assert (first.plan.world_size, second.plan.world_size) == (1, 1)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_the_only_rank_that_comes_stops_after_the_timeout_naming_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _torchrun_variables(monkeypatch, world_size=3)
    with pytest.raises(DistributedError, match=r"ranks \[1, 2\] did not reach"):
        D.init_from_env("cpu", timeout=datetime.timedelta(seconds=0.5))
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    ("variables", "words"),
    [
        ({"RANK": "one"}, "not integers"),
        ({"RANK": "2"}, "RANK must be in"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT a TCP port"),
    ],
)
def test_bad_torchrun_variables_are_named(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], words: str
) -> None:
    _torchrun_variables(monkeypatch, world_size=2)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DistributedError, match=words):
        D.init_from_env("cpu", timeout=datetime.timedelta(seconds=1))


def _torchrun_variables(monkeypatch: pytest.MonkeyPatch, world_size: int) -> None:
    """Rank 0 of ``world_size`` as a launcher without torchrun's store sets it: rank 0
    serves the store on a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name in [n for n in os.environ if n.startswith("TORCHELASTIC")]:
        monkeypatch.delenv(name)
    for name, value in dict(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE=str(world_size)
    ).items():
        monkeypatch.setenv(name, value)


# ------------------------------------------------------------------ resume


def test_two_ranks_resume_bit_identical_to_the_run_that_never_stopped(
    suites: dict[str, list[dict[str, Any]]], suite_folder: Path
) -> None:
    """2 gloo ranks, a shuffled DataLoader sharded by autoaccum, token-weighted losses,
    dropout, AdamW: stopped after 3 of 7 steps (in the suite's launch), resumed by new
    processes from the checkpoint it left."""
    resumed = suite_folder / "resumed"
    shutil.copytree(suite_folder / "ckpt", resumed / "ckpt")
    second = launch(("resume_second",), resumed)
    for rank in range(WORLD):
        straight = suites["resume_first"][rank]["straight"]
        got = second[rank]["resume_second"]
        assert got["losses"] == straight["losses"]
        for p, q in zip(got["params"], straight["params"], strict=True):
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
    (the healthy one says what happened where), well inside the collective timeout."""
    outs = [out[case] for out in suites["callback_faults"]]
    assert [kind for kind, _, _ in outs] == kinds
    distributed = [message for kind, message, _ in outs if kind == "DistributedError"]
    assert all(says in message for message in distributed), distributed
    assert max(seconds for _, _, seconds in outs) < TIMEOUT.total_seconds() / 2  # not waited out
