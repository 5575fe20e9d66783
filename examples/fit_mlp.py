"""Plain ``autoaccum.fit``: an MLP on a synthetic 3-class task, 256 samples per optimizer step.

    python examples/fit_mlp.py

``fit`` probes the largest micro-batch that trains (on a GPU against its memory; on the CPU,
which has no allocator limit, the whole window of 256 fits), plans the accumulation so that
micro-batches × accum_iter × ranks == 256 exactly, and trains. The second run sets a
micro-batch ceiling of its own, ``max_micro=100``: the same 256 samples per step, as
86 + 85 + 85, and the same losses step by step (to float32 rounding), because every
accumulated step is the step of one big batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoaccum


def make_data(samples: int = 4096) -> TensorDataset:
    """Points in 20 dimensions; the class is which of the first three coordinates is largest."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 20, generator=gen)
    return TensorDataset(x, x[:, :3].argmax(dim=1))


def make_model() -> nn.Module:
    torch.manual_seed(0)  # both runs start from the same weights
    return nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 3))


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def main() -> None:
    data = make_data()
    loader = DataLoader(data, batch_size=64, shuffle=True)
    runs = {}
    for max_micro in (None, 100):  # None: probed; 100: a ceiling of your own
        model = make_model()
        torch.manual_seed(1)  # the same shuffled order in both runs
        result = autoaccum.fit(
            model, loader, target_batch=256, epochs=4, max_micro=max_micro, report=False
        )
        runs[max_micro] = result
        print(result.plan.describe())
        print(
            f"  {result.optimizer_steps} optimizer steps, loss {result.losses[0]:.3f} → "
            f"{result.losses[-1]:.3f}, train accuracy {accuracy(model, data):.1%}"
        )
    gap = max(abs(a - b) for a, b in zip(runs[None].losses, runs[100].losses, strict=True))
    print(f"largest difference between the two runs' step losses: {gap:.1e}")
    if runs[100].plan.micro_sizes != (86, 85, 85) or gap > 1e-4:
        raise SystemExit("unexpected: the capped plan, or losses that differ")


if __name__ == "__main__":
    main()
