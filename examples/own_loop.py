"""Your own training loop, with exact accumulation: ``autoaccum.Accumulator``.

    python examples/own_loop.py

The loop stays yours (logging, evaluation, anything between steps); the accumulator cuts each
window of ``target_batch`` samples into the plan's micro-batches, weights each one by its
share of the window's items before the first backward, and steps once per window. Without a
plan of your own it probes the data first; ``replan(100)`` here sets a ceiling instead, so
that the CPU shows an accumulation: 256 = 86 + 85 + 85.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoaccum


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 20, generator=gen)
    y = x[:, :3].argmax(dim=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=8, gamma=0.5)

    acc = autoaccum.Accumulator(
        model,
        optimizer,
        target_batch=256,
        loss_fn=nn.CrossEntropyLoss(),  # a loss module: applied as loss(model(inputs), targets)
        scheduler=scheduler,  # stepped once per optimizer step
    )
    print(acc.replan(100).describe())  # or acc.probe(batch); or let windows() probe the data
    try:
        for epoch in range(3):
            for window in acc.windows(loader, epoch):  # 256 samples (the last may be short)
                for micro in window:  # the plan's micro-batches, each weighted
                    acc.backward(micro)  # forward + weighted backward; returns its mean loss
                outcome = acc.step()  # clip, optimizer, scheduler, zero_grad
            print(
                f"epoch {epoch}: {acc.steps} steps, last window {outcome.samples} samples, "
                f"loss {outcome.loss:.3f}, lr {scheduler.get_last_lr()[0]:.3f}"
            )
    finally:
        acc.close()  # releases what a multi-rank run set up; call it in your loop too
    with torch.no_grad():
        accuracy = float((model(x).argmax(dim=1) == y).float().mean())
    print(f"train accuracy {accuracy:.1%}")
    if accuracy < 0.8:
        raise SystemExit("unexpected: the loop did not learn")


if __name__ == "__main__":
    main()
