"""The same runs on any number of ranks: ``python world_size_job.py OUTDIR JOB [JOB …]``.

Run on 1 process or under torchrun (``fit`` makes the process group from torchrun's
variables). Every job builds the same seeded data and model, trains, and this rank saves what
the test compares to ``OUTDIR/<job>-rank<R>.pt``. Jobs:

* ``loader``, ``shuffled``: 37 token sequences, target 10, max_micro 3, 2 epochs, a DataLoader
  in order or shuffled (seeded 3): the parameters, losses, samples seen, the plan;
* ``order3``, ``order4``: the first epoch's sample order, as the ranks read it (seed 3 or 4);
* ``straight``: 7 steps; ``stopped``: the same run stopped after 3 with a checkpoint in
  ``OUTDIR/ckpt-<world>``; ``resume<N>``: resume the checkpoint taken on N ranks to 7 steps;
* ``own_micro``: rank 0 with max_micro 3, rank 1 with 5; ``own_probe``: the probe finds 3 on
  rank 0 and 5 on rank 1 (an emulated out-of-memory error above them);
* ``tokens``: 20 loss tokens a step over variable-length rows (``tokens_data``), 2 epochs,
  shuffled: the parameters and each step's items.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: helpers, reference

import torch
from helpers import OOMAbove
from reference import LR, token_ce, token_model, tokens
from torch import nn
from torch.utils.data import DataLoader, Dataset

import autoaccum

SAMPLES, TARGET, MICRO = 37, 10, 3


class Numbered(Dataset[tuple[torch.Tensor, ...]]):
    """``tokens(37)`` with each sample's index beside it (the loss records the order)."""

    def __init__(self) -> None:
        self.data = tokens(SAMPLES)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        x, y = self.data[index]
        return x, y, torch.tensor(index)


class Seen:
    """The token loss, recording the indices of the samples each training step sees."""

    def __init__(self) -> None:
        self.order: list[int] = []

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.order.extend(int(i) for i in batch[2])
        return token_ce(model, batch[:2])


def loader(shuffle: bool = False) -> DataLoader[Any]:
    return DataLoader(Numbered(), batch_size=4, shuffle=shuffle)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def train(model: nn.Module, data: Any, **kwargs: Any) -> tuple[autoaccum.FitResult, Seen]:
    seen = Seen()
    kwargs.setdefault("max_micro", MICRO)
    result = autoaccum.fit(
        model,
        data,
        TARGET,
        loss_fn=seen,
        count_fn=lambda b: (b[1] != -100).sum(),
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        device="cpu",
        progress=False,
        report=False,
        **kwargs,
    )
    return result, seen


def summary(model: nn.Module, result: autoaccum.FitResult, seen: Seen) -> dict[str, Any]:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "losses": list(result.losses),
        "samples_seen": result.samples_seen,
        "steps": result.optimizer_steps,
        "micro_sizes": result.plan.micro_sizes,
        "rank_sizes": result.plan.rank_sizes,
        "describe": result.plan.describe(),
        "order": seen.order,
    }


def epochs(shuffle: bool) -> dict[str, Any]:
    model = token_model()
    torch.manual_seed(3)  # the user's seed: the shuffled order draws from it
    result, seen = train(model, loader(shuffle), epochs=2)
    return summary(model, result, seen)


def order(seed: int) -> dict[str, Any]:
    model = token_model()
    torch.manual_seed(seed)
    result, seen = train(model, loader(shuffle=True), max_steps=4)
    return summary(model, result, seen)


def steps(out: Path, upto: int, **kwargs: Any) -> dict[str, Any]:
    """The shuffled 2-epoch run to ``upto`` steps (7 is straight through)."""
    model = token_model()
    torch.manual_seed(3)
    result, seen = train(model, loader(shuffle=True), epochs=2, max_steps=upto, **kwargs)
    return summary(model, result, seen)


def own_micro() -> dict[str, Any]:
    model = token_model()
    result, seen = train(model, loader(), max_micro=3 if rank() == 0 else 5)
    return summary(model, result, seen)


def own_probe() -> dict[str, Any]:
    """The probe runs out of memory above 3 samples on rank 0, above 5 on rank 1."""
    inner = token_model()
    model = nn.Sequential(*inner, OOMAbove(3 if rank() == 0 else 5))
    result, seen = train(model, loader(), max_micro=None, margin=0.0)
    return {**summary(model, result, seen), "max_micro": result.plan.max_micro}


def token_budget() -> dict[str, Any]:
    from tokens_data import LR as TOKEN_LR
    from tokens_data import Rows, TinyLM, collate, lm_loss

    class Items(autoaccum.Callback):
        def __init__(self) -> None:
            self.items: list[float] = []

        def on_step(self, run: autoaccum.RunView) -> None:
            self.items.append(run.state().items_seen)

    model, items = TinyLM(), Items()
    torch.manual_seed(3)
    result = autoaccum.fit(
        model,
        DataLoader(Rows(), batch_size=4, collate_fn=collate, shuffle=True),
        target_tokens=20,
        loss_fn=lm_loss,
        count_fn=autoaccum.count_tokens(shift=True),
        optimizer=torch.optim.SGD(model.parameters(), lr=TOKEN_LR),
        max_micro=3,
        epochs=2,
        device="cpu",
        progress=False,
        report=False,
        callbacks=[items],
    )
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "items": items.items,
        "steps": result.optimizer_steps,
    }


def main() -> None:
    out, jobs = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    warnings.simplefilter("ignore")  # what the runs warn about is checked elsewhere
    for job in jobs:
        if job in ("loader", "shuffled"):
            saved = epochs(shuffle=job == "shuffled")
        elif job.startswith("order"):
            saved = order(int(job[len("order") :]))
        elif job == "straight":
            saved = steps(out, 7)
        elif job == "stopped":
            folder = out / f"ckpt-{world}"
            saved = steps(out, 3, callbacks=[autoaccum.Checkpoint(folder, every=3)])
        elif job.startswith("resume"):
            saved = steps(out, 7, resume=out / f"ckpt-{job[len('resume') :]}")
        elif job == "own_micro":
            saved = own_micro()
        elif job == "own_probe":
            saved = own_probe()
        elif job == "tokens":
            saved = token_budget()
        else:
            raise SystemExit(f"unknown job {job}")
        torch.save(saved, out / f"{job}-w{world}-rank{rank()}.pt")


if __name__ == "__main__":
    main()
