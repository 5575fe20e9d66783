"""One rank of a 2-process gloo test, launched by torchrun:
``torchrun --standalone --nproc-per-node=2 worker.py SCENARIO[+SCENARIO…] OUTDIR``.

The scenarios run one after the other in this process. Those whose names end in ``_env``
leave the process group to ``autoaccum.fit`` (torchrun's variables are in the environment);
the others run in a group initialised here (torch's ``env://``, a ``TIMEOUT`` for its
collectives), made before the first of them and destroyed before the first ``_env`` one.
Each rank saves what the test asserts on to ``OUTDIR/rank{RANK}.pt``, and, when the process
exits, whether a process group was still left then to ``OUTDIR/exit{RANK}.txt``. Any
exception makes the process fail with its traceback on stderr, which the test shows.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers, dist_workers

import torch
import torch.distributed as dist
from helpers import mlp
from reference import LR, ce, fit_sgd, samples, token_model, tokens
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import DataLoader

import autoaccum
from autoaccum import distributed as D
from autoaccum.train.callbacks import Callback, Checkpoint, Evaluate, RunView
from dist_workers import fit_group
from dist_workers.common import WORLD, Faults, bn_mlp, faulty_mlp, out_dir, params, summary

TIMEOUT = timedelta(seconds=60)  #: the collectives' in the group made here


class WindowTracker:
    """Counts forwards of the current window; the optimizer's step closes a window."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.forwards = 0
        self.events: list[tuple[str, int]] = []  # (what, forwards so far in this window)
        self.windows: list[list[tuple[str, int]]] = []
        module.register_forward_pre_hook(self._forward)
        optimizer.register_step_pre_hook(self._step)

    def _forward(self, *_: Any) -> None:
        if torch.is_grad_enabled():
            self.forwards += 1

    def _step(self, *_: Any) -> None:
        self.windows.append([*self.events, ("step", self.forwards)])
        self.events, self.forwards = [], 0

    def note(self, what: str) -> None:
        self.events.append((what, self.forwards))


# --------------------------------------------------------------------------- scenarios


def tokens_(rank: int) -> dict[str, Any]:
    model = token_model()
    result = fit_sgd(model, DataLoader(tokens(30), batch_size=4, shuffle=False), 14, max_micro=4)
    return {**summary(result), "params": params(model)}


def comm_hook(rank: int) -> dict[str, Any]:
    """A DDP model wrapped here; its comm hook records when gradients are all-reduced."""
    inner = mlp()
    model = nn.parallel.DistributedDataParallel(inner)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    tracker = WindowTracker(inner, optimizer)

    def hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP rejects string annotations
        tracker.note("all_reduce")
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, hook)
    result = autoaccum.fit(
        model,
        DataLoader(samples(28), batch_size=5),
        12,
        loss_fn=ce,
        optimizer=optimizer,
        max_micro=2,
        device="cpu",
        progress=False,
        report=False,
        sync="overlap",  # DDP's own reduction (with the user's comm hook) on the last micro-step
    )
    return {**summary(result), "params": params(inner), "windows": tracker.windows}


def oom_on_rank0(rank: int) -> dict[str, Any]:
    """Rank 0 runs out of memory above 3 samples, rank 1 never: the probe must agree."""
    model = mlp(limit=3 if rank == 0 else 10**9)
    result = fit_sgd(model, DataLoader(samples(32), batch_size=8), 16, loss_fn=ce)
    # The same with a BatchNorm: DDP broadcasts buffers on each forward, so a rank that
    # skips a trial's forwards must not leave the other rank in a mismatched collective.
    bn = bn_mlp(limit=3 if rank == 0 else 10**9)
    bn_result = fit_sgd(bn, DataLoader(samples(32), batch_size=8), 16, loss_fn=ce)
    return {**summary(result), "params": params(model), "bn": summary(bn_result)}


def fsdp2(rank: int) -> dict[str, Any]:
    """An already fully_shard-ed model, probed (no max_micro) and trained."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = mlp(limit=3)  # the probe runs out of memory above 3 samples on both ranks
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    tracker = WindowTracker(model, optimizer)
    set_sync = model.set_requires_gradient_sync

    def recording_set_sync(enabled: bool, *, recurse: bool = True) -> None:
        tracker.note(f"sync={enabled}")
        set_sync(enabled, recurse=recurse)

    model.set_requires_gradient_sync = recording_set_sync  # type: ignore[method-assign]
    reduce_scatter = dist.reduce_scatter_single

    def recording_reduce_scatter(*args: Any, **kwargs: Any) -> Any:
        tracker.note("reduce_scatter")
        return reduce_scatter(*args, **kwargs)

    dist.reduce_scatter_single = recording_reduce_scatter
    data = DataLoader(samples(26), batch_size=4)
    result = autoaccum.fit(
        model,
        data,
        10,
        loss_fn=ce,
        optimizer=optimizer,
        device="cpu",
        progress=False,
        report=False,
        margin=0.0,
    )
    out = {**summary(result), "params": params(model), "windows": tracker.windows}
    # The probe's trials never reduce-scatter, yet their optimizer step must allocate state.
    adam_model = mlp(limit=3)
    fully_shard(adam_model, mesh=mesh)
    adam = torch.optim.AdamW(adam_model.parameters())
    found = autoaccum.probe(adam_model, (samples(4).tensors), loss_fn=ce, optimizer=adam, upper=8)
    out["probe_fixed"] = dict(found.fixed_bytes)
    out["adam_state_after_probe"] = len(adam.state)
    # Rank-local data whose last windows differ in micro-steps (3 vs 2) on the two ranks:
    # the rank with fewer runs a micro-step that adds nothing (FSDP2 gathers in every one).
    other = mlp()
    fully_shard(other, mesh=mesh)
    data = samples(15) if rank == 0 else samples(13, seed=1)
    batches = [tuple(t[i : i + 4] for t in data.tensors) for i in range(0, len(data), 4)]
    uneven = fit_sgd(other, batches, 10, loss_fn=ce, max_micro=2)
    out["uneven"] = {**summary(uneven), "params": params(other)}
    return out


def rank_local(rank: int) -> dict[str, Any]:
    """Lists of batches, rank-local: rank 0 holds 4 windows, rank 1 only 3 (the last short)."""
    data = samples(20) if rank == 0 else samples(14, seed=1)
    batches = [tuple(t[i : i + 3] for t in data.tensors) for i in range(0, len(data), 3)]
    model = mlp()
    result = fit_sgd(model, batches, 10, loss_fn=ce, max_micro=2)
    return {**summary(result), "params": params(model)}


def _faulty_fit(faults: Faults, **kwargs: Any) -> dict[str, Any]:
    model = faulty_mlp(faults)
    result = fit_sgd(
        model, DataLoader(samples(48), batch_size=8), 16, loss_fn=ce, max_micro=4, **kwargs
    )
    return {
        **summary(result),
        "params": params(model),
        "oom_retries": result.oom_retries,
        "resizes": [(r.step, r.old, r.new, r.reason) for r in result.resizes],
    }


#: (name, forwards that fail on rank 0, on rank 1, backwards that fail on rank 0, on rank 1).
#: 8 samples per rank and window, micro-batches of 4: two training forwards per window.
OOM_CASES = {
    "forward_on_rank1": ((), (3,), (), ()),  # window 1, first micro-step
    "last_backward_on_rank1": ((), (), (), (2,)),  # window 0, its last micro-step's backward
    "both_ranks": ((5,), (5,), (), ()),  # window 2 on both ranks at once
    "same_window_twice": ((3, 5), (), (), ()),  # window 1 fails, and fails again smaller
}


def oom_recovery(rank: int) -> dict[str, Any]:
    """An out-of-memory error on one rank or both, at a forward or the last backward, once or
    twice in the same window: the window is re-run smaller on every rank, exactly."""
    out = {}
    for name, (f0, f1, b0, b1) in OOM_CASES.items():
        faults = Faults(forwards=f0 if rank == 0 else f1, backwards=b0 if rank == 0 else b1)
        out[name] = _faulty_fit(faults)
    return out


class OOMInStep(torch.optim.SGD):
    def __init__(self, params: Any, fail_at: int | None) -> None:
        super().__init__(params, lr=LR)
        self.fail_at = fail_at
        self.calls = 0

    def step(self, closure: Any = None) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 MiB (optimizer)"
            )
        return super().step(closure)


def failures(rank: int) -> dict[str, Any]:
    """One rank fails where the others cannot recover it: every rank stops, none waits."""
    out: dict[str, Any] = {}
    model = mlp()
    optimizer = OOMInStep(model.parameters(), fail_at=2 if rank == 1 else None)
    start = time.monotonic()
    try:
        autoaccum.fit(
            model,
            DataLoader(samples(48), batch_size=8),
            16,
            loss_fn=ce,
            optimizer=optimizer,
            max_micro=4,
            device="cpu",
            progress=False,
            report=False,
        )
    except Exception as exc:
        out["optimizer"] = (type(exc).__name__, str(exc), time.monotonic() - start)

    def broken(model: nn.Module, batch: Any) -> Any:
        if rank == 1 and broken.calls == 3:
            raise ValueError("a corrupt sample in the data")
        broken.calls += 1
        return ce(model, batch)

    broken.calls = 0  # type: ignore[attr-defined]
    start = time.monotonic()
    try:
        fit_sgd(mlp(), DataLoader(samples(48), batch_size=8), 16, loss_fn=broken, max_micro=4)
    except Exception as exc:
        out["loss_fn"] = (type(exc).__name__, str(exc), time.monotonic() - start)
    out["reduction"] = _no_memory_to_reduce(rank)
    return out


def _no_memory_to_reduce(rank: int) -> tuple[str, str, float, bool]:
    """Rank 1 runs out of memory taking the deferred reduction's buffers in window 2, after
    rank 0 has taken its own: both stop at once, and window 2 reaches neither's weights."""
    model = mlp()
    after: list[list[torch.Tensor]] = []

    class Weights(Callback):
        def on_step(self, run: RunView) -> None:
            after.append([p.detach().clone() for p in model.parameters()])

    real, calls = D.reserve, [0]

    def reserve(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if rank == 1 and calls[0] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 25.00 MiB")
        return real(*args, **kwargs)

    D.reserve = reserve  # type: ignore[assignment]
    start = time.monotonic()
    try:
        fit_sgd(
            model,
            DataLoader(samples(48), batch_size=8),
            16,
            max_micro=4,
            loss_fn=ce,
            callbacks=[Weights()],
        )
        return ("no error", "", time.monotonic() - start, False)
    except Exception as exc:
        kept = len(after) == 1 and all(
            torch.equal(p, q) for p, q in zip(model.parameters(), after[0], strict=True)
        )
        return (type(exc).__name__, str(exc), time.monotonic() - start, kept)
    finally:
        D.reserve = real  # type: ignore[assignment]


class FailOnRank1(Callback):
    """A user's callback that raises on rank 1 at step 2 (rank 0 carries on)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_step(self, run: RunView) -> None:
        if self.rank == 1 and run.state().step == 2:
            raise ValueError("a bug in rank 1's callback")


class SaveOnRank0(Callback):
    """The usual DDP habit, ``if rank == 0: save``: every rank must call it here."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_step(self, run: RunView) -> None:
        if self.rank == 0:
            run.save_checkpoint(out_dir() / "rank0-only")


def callback_faults(rank: int) -> dict[str, Any]:
    """Callbacks and settings that part the ranks: each must end every rank promptly, with an
    error saying what happened, instead of one rank waiting in a collective."""
    import time

    def evaluating_loss(model: nn.Module, batch: Any) -> Any:
        if rank == 1 and not torch.is_grad_enabled():
            raise ValueError("a bug in rank 1's evaluation")
        return ce(model, batch)

    loader = DataLoader(samples(40), batch_size=4)
    cases: dict[str, dict[str, Any]] = {
        "fault_then_checkpoint": {
            "callbacks": [FailOnRank1(rank), Checkpoint(out_dir() / f"ckpt-{rank}", every=1)]
        },
        "fault_then_evaluate": {"callbacks": [FailOnRank1(rank), Evaluate(loader, every=1)]},
        "fault_in_evaluation": {
            "callbacks": [Evaluate(loader, every=2)],
            "loss_fn": evaluating_loss,
        },
        "save_on_rank0_only": {"callbacks": [SaveOnRank0(rank)]},
        "targets_differ": {"target": 8 if rank == 0 else 12},
        "datasets_differ": {"data": loader if rank == 0 else DataLoader(samples(32), batch_size=4)},
    }
    out: dict[str, Any] = {}
    for name, case in cases.items():
        start = time.monotonic()
        try:
            fit_sgd(
                mlp(),
                case.get("data", loader),
                case.get("target", 8),
                loss_fn=case.get("loss_fn", ce),
                max_micro=4,
                callbacks=case.get("callbacks", ()),
            )
        except Exception as exc:
            out[name] = (type(exc).__name__, str(exc), time.monotonic() - start)
        else:
            out[name] = ("no error", "", time.monotonic() - start)
    return out


def _resume_job(steps: int, **kwargs: Any) -> dict[str, Any]:
    """The single-process resume test's job, on this rank's share: 40 samples, no loader
    workers, no scheduler."""
    from resume_job import train

    net, result = train(steps, samples=40, workers=0, scheduler=False, **kwargs)
    return {"params": params(net), "losses": list(result.losses)}


def resume_first(rank: int) -> dict[str, Any]:
    """The straight run (7 steps), and the same run stopped after 3 with a checkpoint."""
    from autoaccum.train.callbacks import Checkpoint

    straight = _resume_job(7)
    _resume_job(3, callbacks=[Checkpoint(out_dir() / "ckpt", every=3)])
    return {"straight": straight}


def resume_second(rank: int) -> dict[str, Any]:
    """New processes resume the stopped run to 7 steps."""
    return _resume_job(7, resume=out_dir() / "ckpt")


SCENARIOS: dict[str, Callable[[int], dict[str, Any]]] = {
    "samples_env": fit_group.samples_env,
    "tokens": tokens_,
    "comm_hook": comm_hook,
    "oom_on_rank0": oom_on_rank0,
    "plan_error_env": fit_group.plan_error_env,
    "fsdp2": fsdp2,
    "rank_local": rank_local,
    "oom_recovery": oom_recovery,
    "failures": failures,
    "callback_faults": callback_faults,
    "failure_env": fit_group.failure_env,
    "more_fits_env": fit_group.more_fits_env,
    "rejoin_env": fit_group.rejoin_env,
    "init_failure_env": fit_group.init_failure_env,
    "missing_rank_env": fit_group.missing_rank_env,
    "resume_first": resume_first,
    "resume_second": resume_second,
}


def main() -> None:
    names = sys.argv[1].split("+")
    rank = int(os.environ["RANK"])
    atexit.register(_record_exit, rank)  # registered first, so it runs after fit's own
    torch.set_num_threads(1)
    out, own_group = {}, False
    for name in names:
        if name.endswith("_env") and own_group:
            dist.destroy_process_group()
            own_group = False
        elif not name.endswith("_env") and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=TIMEOUT)  # env://, torchrun's variables
            own_group = True
        out[name] = SCENARIOS[name](rank)
    if own_group:
        dist.destroy_process_group()
    torch.save(out, out_dir() / f"rank{rank}.pt")


def _record_exit(rank: int) -> None:
    """Whether a process group was still left once every other exit handler had run."""
    (out_dir() / f"exit{rank}.txt").write_text(str(dist.is_initialized()))


if __name__ == "__main__":
    main()
