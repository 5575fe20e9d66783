"""PyTorch Lightning: keep your LightningModule and Trainer, add one callback.

    python examples/lightning_mlp.py

``AutoAccum(target_batch=256)`` probes the largest micro-batch with your own
``training_step`` before training starts, then sets the DataLoader's batch size and
``trainer.accumulate_grad_batches`` so that micro-batch × accumulate_grad_batches × devices ==
256 exactly. Lightning's accumulation needs equal micro-batches, so the micro-batch is the
largest divisor of the per-device share under the ceiling: with ``max_micro=100`` (the second
run) that is 64 × 4, where ``autoaccum.fit`` would run 86 + 85 + 85.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from autoaccum.lightning import AutoAccum


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 3))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)  # a mean over the samples: exact under Lightning
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 20, generator=gen)
    loader = DataLoader(TensorDataset(x, x[:, :3].argmax(dim=1)), batch_size=32, shuffle=True)

    for max_micro in (None, 100):  # None: probed with training_step; 100: a ceiling of yours
        torch.manual_seed(0)
        model = Classifier()
        auto = AutoAccum(target_batch=256, max_micro=max_micro)  # global: all devices together
        trainer = pl.Trainer(
            max_epochs=2,
            accelerator="cpu",
            callbacks=[auto],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, train_dataloaders=loader)
        assert auto.batching is not None  # set when training starts (its line is logged)
        print(
            f"max_micro={max_micro}: accumulate_grad_batches {trainer.accumulate_grad_batches}, "
            f"{trainer.global_step} optimizer steps, "
            f"last loss {float(trainer.callback_metrics['train_loss']):.3f}"
        )
    if (auto.batching.plan.micro_batch, trainer.accumulate_grad_batches) != (64, 4):
        raise SystemExit("unexpected: the plan under max_micro=100")


if __name__ == "__main__":
    main()
