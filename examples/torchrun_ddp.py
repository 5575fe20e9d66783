"""Several processes: the same ``fit`` call under ``torchrun``, here 2 ranks on the CPU (gloo).

    python -m torch.distributed.run --standalone --nproc_per_node=2 examples/torchrun_ddp.py
    torchrun --standalone --nproc_per_node=8 examples/torchrun_ddp.py   # 8 GPUs: NCCL

``fit`` sees torchrun's variables and sets up the process group itself (NCCL on CUDA, gloo
otherwise), wraps the model in DistributedDataParallel, shards the DataLoader with a
DistributedSampler, and takes ``target_batch`` as the global batch: 256 samples per optimizer
step over all ranks, 128 on each here. The ranks agree on every probe trial, on every
micro-step's outcome and on the window's item count before the first backward. Without
torchrun the script runs on one process, unchanged.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoaccum


def main() -> None:
    gen = torch.Generator().manual_seed(0)  # every rank builds the same dataset
    x = torch.randn(4096, 20, generator=gen)
    loader = DataLoader(TensorDataset(x, x[:, :3].argmax(dim=1)), batch_size=64, shuffle=True)
    torch.manual_seed(0)  # and the same initial weights (DDP also broadcasts rank 0's)
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 3))

    result = autoaccum.fit(
        model, loader, target_batch=256, epochs=2, timeout=120, progress=False, report=False
    )
    # every rank gets the same result (the plan, the global losses and counts); rank 0 prints
    if os.environ.get("RANK", "0") == "0":
        print(result.plan.describe())
        print(
            f"{result.optimizer_steps} optimizer steps, {result.samples_seen} samples over all "
            f"ranks, loss {result.losses[0]:.3f} → {result.losses[-1]:.3f}"
        )


if __name__ == "__main__":
    main()
