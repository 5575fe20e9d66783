"""FSDP2 checkpoints on 2 gloo ranks: ``torchrun --nproc_per_node=2 checkpoint_ranks_job.py OUT``.

For SGD without momentum (no optimizer state) and AdamW (sharded state): 4 steps straight
with a checkpoint after 2, then a resume from that checkpoint to 4; each rank saves the full
parameters of both (gathered) to ``OUT/rank{R}.pt``. Then, with DDP: ``resume="auto"`` on an
empty folder (what each rank was told, the run id each rank saw), and a checkpoint folder
that cannot be made, on a BatchNorm model (the error each rank ends with, and how soon).
"""

from __future__ import annotations

import datetime
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from dist_workers.common import bn_mlp
from helpers import mlp
from reference import ce, samples
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader

import autoaccum
from autoaccum.train.callbacks import Callback, Checkpoint, RunView

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01),
}


def train(name: str, steps: int, **kwargs: Any) -> nn.Module:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = mlp()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    autoaccum.fit(
        model,
        DataLoader(samples(32), batch_size=4, shuffle=True),
        8,
        loss_fn=ce,
        optimizer=OPTIMIZERS[name](model.parameters()),
        max_steps=steps,
        max_micro=2,
        device="cpu",
        progress=False,
        report=False,
        **kwargs,
    )
    return model


def full(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]  # type: ignore[operator]


class RunId(Callback):
    def on_train_start(self, run: RunView) -> None:
        self.run_id = run.run_id


def plain(out: Path, rank: int) -> dict[str, Any]:
    """DDP: resume="auto" into an empty folder; a folder under a regular file."""

    def fit(callbacks: list[Any], model: nn.Module | None = None, **kwargs: Any) -> None:
        model = model if model is not None else mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        data = DataLoader(samples(32), batch_size=4)
        autoaccum.fit(
            model, data, 8, loss_fn=ce, optimizer=optimizer, max_micro=2, device="cpu",
            progress=False, report=False, callbacks=callbacks, **kwargs,
        )  # fmt: skip

    seen = RunId()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([seen, Checkpoint(out / "auto", every=2)], resume="auto", max_steps=2)
    told = [str(w.message) for w in caught if "resume='auto'" in str(w.message)]
    if rank == 0:
        (out / "afile").write_text("a file")
    dist.barrier()
    started = time.monotonic()
    try:
        # BatchNorm, overlapped sync: DDP's forward broadcasts the buffers, a collective
        # outside the ranks' exchange that rank 0 would never join
        folder = out / "afile" / "ckpt"
        fit([Checkpoint(folder, every=2)], bn_mlp(), max_steps=2, sync="overlap")
        error: tuple[str, str, float] | None = None
    except Exception as exc:
        error = (type(exc).__name__, str(exc), time.monotonic() - started)
    return {"told": told, "run_id": seen.run_id, "error": error}


def main(out: Path) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    try:
        for name in OPTIMIZERS:
            folder = out / name
            torch.manual_seed(0)
            straight = full(train(name, 4, callbacks=[Checkpoint(folder, every=2, keep=2)]))
            resumed = full(train(name, 4, resume=folder / "step-00000002.pt"))
            result[name] = {"straight": straight, "resumed": resumed}
        result["plain"] = plain(out, rank)
    finally:
        dist.destroy_process_group()
    torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
