"""The LightningModule the Lightning tests train, and a 2-process DDP run of it on the CPU.

Run as ``torchrun --standalone --nproc-per-node=2 tests/lightning_ddp_worker.py OUT`` (the
test does, through tests/launch.py): Lightning then joins the processes torchrun started
instead of launching its own (gloo). Rank 1's model runs out of memory above
6 samples, rank 0's never, so the ranks must agree on every probe trial. Each rank writes what
it saw to ``OUT/rank{r}.json``; the test compares it with a single-process float64 reference.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from helpers import mlp
from reference import LR, ce, samples
from torch import nn

from autoaccum.lightning import AutoAccum

TARGET = 16  # global: 8 per rank
SAMPLES = 64
RANK1_LIMIT = 6


class Net(pl.LightningModule):
    """``loss(net, batch)`` trained with plain SGD; ``self.log`` is called as users do."""

    def __init__(self, net: nn.Module, loss: Callable[..., torch.Tensor], lr: float) -> None:
        super().__init__()
        self.net, self.loss, self.lr = net, loss, lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.net, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Record(pl.Callback):
    """The micro-batch sizes trained, the optimizer steps and the accumulation in force."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.steps = 0
        self.accumulate = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.accumulate = trainer.accumulate_grad_batches

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.sizes.append(len(batch[0]))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.steps += 1


def trainer(*callbacks: pl.Callback, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer for one epoch."""
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    model = Net(mlp(RANK1_LIMIT if rank == 1 else 10**9), ce, LR)
    auto, record = AutoAccum(TARGET), Record()
    run = trainer(auto, record, strategy="ddp", devices=2)
    loader = torch.utils.data.DataLoader(samples(SAMPLES), batch_size=5, shuffle=True)
    run.fit(model, loader)
    assert auto.batching is not None
    assert auto.batching.probe is not None
    trials = [[t.size, t.passed, t.failure] for t in auto.batching.probe.trials]
    saved = {
        "rank": run.global_rank,
        "world": run.world_size,
        "trials": trials,
        "ceiling": auto.batching.plan.max_micro,
        "micro": auto.batching.plan.micro_batch,
        "accumulate": record.accumulate,
        "sizes": record.sizes,
        "steps": record.steps,
        "describe": auto.batching.describe(),
        "params": [p.detach().reshape(-1).tolist() for p in model.parameters()],
    }
    (out / f"rank{run.global_rank}.json").write_text(json.dumps(saved))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
