"""A training job that can stop and resume: ``python resume_job.py OUT STEPS [RESUME_DIR]``.

Float64, a shuffled DataLoader with workers, dropout, token-weighted losses, AdamW and a
scheduler: every random stream and every piece of state a resume must carry. Trains until
``STEPS`` optimizer steps in all (checkpointing every 2 steps into ``OUT/ckpt``), resuming
from ``RESUME_DIR`` when given, and saves the final parameters and losses to ``OUT/result.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from reference import tokens
from torch import nn
from torch.utils.data import DataLoader

import autoaccum
from autoaccum.train.callbacks import Checkpoint


def model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Embedding(11, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 11)).double()


def train(
    steps: int, *, samples: int = 30, workers: int = 2, scheduler: bool = True, **fit: Any
) -> tuple[nn.Module, autoaccum.FitResult]:
    """The job's model trained to ``steps`` optimizer steps in all (``fit``'s own arguments,
    ``callbacks`` and ``resume``, passed on)."""
    torch.manual_seed(123)  # the run's own randomness: data order, dropout
    net = model()
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    loader = DataLoader(tokens(samples), batch_size=4, shuffle=True, num_workers=workers)
    result = autoaccum.fit(
        net,
        loader,
        8,
        optimizer=optimizer,
        scheduler=schedule if scheduler else None,
        epochs=3,
        max_steps=steps,
        max_micro=3,
        device="cpu",
        progress=False,
        report=False,
        **fit,
    )
    return net, result


def job(out: Path, steps: int, resume: Path | None) -> autoaccum.FitResult:
    callbacks = [Checkpoint(out / "ckpt", every=2, keep=2)]
    net, result = train(steps, callbacks=callbacks, resume=resume)
    params = [p.detach().clone() for p in net.parameters()]
    torch.save({"params": params, "losses": list(result.losses)}, out / "result.pt")
    return result


if __name__ == "__main__":
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    job(out, steps, Path(sys.argv[3]) if len(sys.argv) > 3 else None)
