"""Scenarios in which ``autoaccum.fit`` makes the process group itself, from torchrun's
variables, and keeps it for the fits that follow in the same process."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from helpers import mlp
from reference import ce, fit_sgd, samples, token_model, tokens
from torch import nn
from torch.utils.data import DataLoader

from autoaccum.errors import DistributedError, PlanError
from dist_workers.common import out_dir, params, summary

ENV_TIMEOUT = 60.0  #: fit's timeout for the group it makes (seconds)
MISSING_TIMEOUT = 3.0  #: fit's timeout (seconds) while rank 1 stays away

#: the process group fit made in ``samples_env``, which later fits must reuse
FIT_GROUP: list[object] = []


def samples_env(rank: int) -> dict[str, Any]:
    """fit initialises the group from torchrun's variables, and keeps it for later fits."""
    assert not dist.is_initialized()
    model = mlp()
    result = fit_sgd(
        model,
        DataLoader(samples(26), batch_size=3),
        10,
        loss_fn=ce,
        max_micro=2,
        timeout=ENV_TIMEOUT,
    )
    FIT_GROUP.append(dist.group.WORLD)
    gloo = dist.group.WORLD._get_backend(torch.device("cpu"))
    return {
        **summary(result),
        "params": params(model),
        "group_kept": dist.is_initialized(),
        "collective_timeout": gloo.options._timeout.total_seconds(),  # not connecting's bound
    }


def plan_error_env(rank: int) -> dict[str, Any]:
    """A target too small for 2 ranks (one would hold no sample of a window): a PlanError on
    every rank, before any work (a target that does not divide, 15, is fine: 8 + 7)."""
    try:
        fit_sgd(mlp(), DataLoader(samples(8), batch_size=4), 1, loss_fn=ce)
    except PlanError as err:
        return {"error": str(err), "same_group": dist.group.WORLD is FIT_GROUP[0]}
    raise AssertionError("fit accepted target_batch=1 on 2 ranks")


def failure_env(rank: int) -> dict[str, Any]:
    """fit made the group itself (no supervisor kills the other rank): one rank's error must
    end both runs promptly, and leave the group to the fits that follow."""
    calls = [0]

    def loss(model: nn.Module, batch: Any) -> Any:
        calls[0] += 1
        if rank == 1 and calls[0] == 3:
            raise RuntimeError("a bug in the loss")
        return ce(model, batch)

    start = time.monotonic()
    try:
        fit_sgd(
            mlp(),
            DataLoader(samples(48), batch_size=8),
            16,
            loss_fn=loss,
            max_micro=4,
            timeout=ENV_TIMEOUT,
        )
    except Exception as exc:
        elapsed = time.monotonic() - start
        return {
            "error": (type(exc).__name__, str(exc), elapsed),
            "same_group": dist.group.WORLD is FIT_GROUP[0],
        }
    raise AssertionError("fit went on after a rank failed")


def more_fits_env(rank: int) -> dict[str, Any]:
    """Two more fits in the same process, on the group the first one made: another model,
    target batch and loss each time (as a pre-training then fine-tuning script, or a sweep)."""
    token_net = token_model()
    tokens_result = fit_sgd(token_net, DataLoader(tokens(30), batch_size=4), 14, max_micro=4)
    probed = mlp(limit=3 if rank == 0 else 10**9)
    probed_result = fit_sgd(probed, DataLoader(samples(32), batch_size=8), 16, loss_fn=ce)
    return {
        "tokens": {**summary(tokens_result), "params": params(token_net)},
        "probed": {**summary(probed_result), "params": params(probed)},
        "same_group": dist.group.WORLD is FIT_GROUP[0],
    }


def rejoin_env(rank: int) -> dict[str, Any]:
    """The script destroys the group between fits: the next fit makes a new one on the same
    torchrun store (torch's own env:// set-up would read the old group's addresses there)."""
    dist.destroy_process_group()
    model = mlp(seed=2)
    result = fit_sgd(model, DataLoader(samples(24), batch_size=6), 8, loss_fn=ce, max_micro=4)
    return {
        **summary(result),
        "params": params(model),
        "new_group": dist.group.WORLD is not FIT_GROUP[0],
    }


def init_failure_env(rank: int) -> dict[str, Any]:
    """Rank 1 cannot connect (no such network interface for gloo): every rank stops with an
    error that says so, within the connect bound, not fit's timeout; then, fixed, the next fit
    of both ranks trains. Twice: rank 1 late (rank 0 learns it while waiting for rank 1, and
    never tries to connect), then rank 0 late (rank 0 is connecting when rank 1 fails)."""
    out: dict[str, Any] = {}
    for late in (1, 0):
        dist.destroy_process_group()
        if rank == late:
            time.sleep(1.0)
        if rank == 1:
            os.environ["GLOO_SOCKET_IFNAME"] = "no-such-if0"
        start = time.monotonic()
        try:
            fit_sgd(mlp(), DataLoader(samples(8), batch_size=4), 4, loss_fn=ce, timeout=120.0)
        except DistributedError as err:
            failed = (str(err), time.monotonic() - start, dist.is_initialized())
        else:
            raise AssertionError("fit trained although rank 1 could not connect")
        finally:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)
        model = mlp(seed=3)
        result = fit_sgd(model, DataLoader(samples(20), batch_size=5), 10, loss_fn=ce, max_micro=5)
        out[f"rank{late}_late"] = {
            "error": failed,
            "after": {**summary(result), "params": params(model)},
        }
    return out


def missing_rank_env(rank: int) -> dict[str, Any]:
    """Rank 1 does not come to fit (a script that skips it on one rank): rank 0 stops after
    fit's timeout, naming the missing rank; rank 1, coming late to the meeting rank 0 gave
    up, stops at once; then both ranks train together again."""
    dist.destroy_process_group()
    gave_up = out_dir() / "rank0_gave_up"
    if rank == 1 and not _wait_for(gave_up, 120.0):
        raise AssertionError("rank 0 never gave up waiting for rank 1")
    start = time.monotonic()
    try:
        fit_sgd(mlp(), DataLoader(samples(8), batch_size=4), 4, timeout=MISSING_TIMEOUT)
    except DistributedError as err:
        failed = (str(err), time.monotonic() - start)
    else:
        raise AssertionError("fit trained without rank 1")
    if rank == 0:
        gave_up.touch()
    model = mlp(seed=4)
    result = fit_sgd(model, DataLoader(samples(20), batch_size=5), 10, loss_fn=ce, max_micro=5)
    return {"error": failed, "after": {**summary(result), "params": params(model)}}


def _wait_for(path: Path, bound: float) -> bool:
    deadline = time.monotonic() + bound
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
