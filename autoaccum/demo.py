"""``autoaccum demo``: train a small classifier on an embedded synthetic task.

Three interleaved spirals (no download), an MLP, AdamW, ``target_batch`` samples per
optimizer step. On a GPU the probe runs against real device memory; on the CPU, which
has no allocator limit, the model runs inside an emulated device budget
(:class:`autoaccum.emulate.MemoryBudget`) so that probing and accumulation show.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autoaccum.emulate import MemoryBudget, training_bytes
from autoaccum.train.fit import fit

__all__ = ["add_arguments", "main", "spirals"]


def spirals(samples: int, *, classes: int = 3, noise: float = 0.15, seed: int = 0) -> TensorDataset:
    """``samples`` points on ``classes`` interleaved spiral arms in the plane."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(samples) % classes
    radius = torch.rand(samples, generator=gen)
    angle = labels * (2 * math.pi / classes) + radius * 3 * math.pi
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    points += noise * radius.unsqueeze(1) * torch.randn(samples, 2, generator=gen)
    perm = torch.randperm(samples, generator=gen)
    return TensorDataset(points[perm], labels[perm])


def _mlp(classes: int, width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(2, width),
        nn.SiLU(),
        nn.Linear(width, width),
        nn.SiLU(),
        nn.Linear(width, width),
        nn.SiLU(),
        nn.Linear(width, classes),
    )


def add_arguments(
    parser: argparse.ArgumentParser, *, positive_int: Callable[[str], int] = int
) -> None:
    """The demo's options; ``positive_int`` parses the counts (a usage error below 1)."""
    parser.add_argument(
        "--target-batch", type=positive_int, default=256, help="samples per optimizer step"
    )
    parser.add_argument("--epochs", type=positive_int, default=20)
    parser.add_argument(
        "--samples", type=positive_int, default=4000, help="size of the synthetic data set"
    )
    parser.add_argument("--width", type=positive_int, default=128, help="hidden width of the MLP")
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA if any)")
    parser.add_argument(
        "--budget-mib",
        type=float,
        default=0.8,
        help="CPU only: the emulated device memory, in MiB (2^20 bytes); the default fits "
        "about 96 samples of the default model, so a target of 256 needs accumulation",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def main(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = spirals(args.samples, seed=args.seed)
    loader = DataLoader(data, batch_size=64, shuffle=True)
    model: nn.Module = _mlp(3, args.width)
    if device.type == "cpu":
        # parameters + gradients + AdamW's two moments: what training keeps resident
        model = MemoryBudget(model, int(args.budget_mib * 2**20), training_bytes(model))
        if not args.json:
            print(
                f"CPU: emulating a device with {args.budget_mib:g} MiB "
                "(activations counted with saved-tensor hooks; no real allocator limit on CPU)"
            )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    steps_per_epoch = math.ceil(args.samples / args.target_batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=steps_per_epoch * args.epochs
    )
    result = fit(
        model,
        loader,
        target_batch=args.target_batch,
        optimizer=optimizer,
        scheduler=scheduler,
        epochs=args.epochs,
        device=device,
        progress=not args.no_progress and not args.json,
        report=not args.json,
    )
    accuracy = _accuracy(model, data, device)
    if args.json:
        print(json.dumps({**result.to_dict(), "accuracy": accuracy}, default=str))
    else:
        print(f"train accuracy {accuracy:.1%}")
    return 0


@torch.no_grad()
def _accuracy(model: nn.Module, data: TensorDataset, device: torch.device) -> float:
    model.eval()
    points, labels = data.tensors
    logits = model(points.to(device))
    return float((logits.argmax(dim=1).cpu() == labels).float().mean())
