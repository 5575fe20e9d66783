"""Fresh-process worker for the GPU tests: train N steps at a micro-batch under a memory cap.

Exit 0 when every step ran, 3 on out-of-memory. Used to check that the size a probe
chose survives a whole run started afresh, not only the probing process.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn
from torch.nn import functional as F

import autoaccum


def workload(device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 4096), nn.GELU(), nn.Linear(4096, 1000)
    ).to(device)
    return model, torch.optim.AdamW(model.parameters())


def batch(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(size)
    return torch.randn(size, 1024, generator=gen).to(device), torch.randint(
        0, 1000, (size,), generator=gen
    ).to(device)


def loss_fn(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(b[0]), b[1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cap-gib", type=float, required=True)
    parser.add_argument("--micro", type=int, required=True)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())  # the cap needs an index
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / total, device)
    model, opt = workload(device)
    try:
        for _ in range(args.steps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(model, batch(args.micro, device))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    except Exception as exc:
        if autoaccum.is_oom(exc):
            print(f"OOM at {args.micro}", file=sys.stderr)
            return 3
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
