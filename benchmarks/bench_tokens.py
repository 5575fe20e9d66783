"""bench_tokens: a token budget against the fixed-sample plan on variable-length text, side by
side in one process, at the same peak memory (issue 20 §3).

The texts are :mod:`benchmarks.varlen`'s (log-normal lengths, a long tail up to the context) as
dict samples (``input_ids``, ``labels``), padded per micro-batch. The model is a small
per-token network whose work and saved activations grow with the padded tokens, inside an
emulated device of ``--budget-mib`` (:class:`autoaccum.emulate.MemoryBudget`: a real
out-of-memory error above it), so both runs have the same peak memory by construction: each
probes the largest micro-batch of the longest samples that fits. Then one epoch each:

* ``fixed``: ``target_batch`` samples per step (as many as ``target_tokens`` holds on
  average), micro-batches of the probed size in the loader's order;
* ``tokens``: ``target_tokens`` loss tokens per step, micro-batches packed longest first under
  the probed budget of padded tokens.

Reported: the padding share (padded tokens over loss tokens, less one), loss tokens per second
(the CPU's wall clock from the first step to the last, the runs alternated ``--repeats`` times,
median), the spread of loss
tokens per optimizer step (max − min over full steps), and out-of-memory retries.

    python -m benchmarks.bench_tokens --out benchmarks/out          # the figure (two minutes)
    python -m benchmarks.bench_tokens --tiny --out /tmp/tokens      # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import autoaccum
from autoaccum.emulate import MemoryBudget, training_bytes
from benchmarks.varlen import LengthSpec, VarLenTokens

IGNORE = -100


class Texts(Dataset[dict[str, torch.Tensor]]):
    """:class:`benchmarks.varlen.VarLenTokens` as dict samples: inputs and shifted labels."""

    def __init__(self, spec: LengthSpec, count: int) -> None:
        self.tokens = VarLenTokens(spec, count)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.tokens[i]
        return {"input_ids": sample[:-1], "labels": sample[1:]}


def collate(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE)
    for j, row in enumerate(rows):
        ids[j, : len(row["input_ids"])] = row["input_ids"]
        labels[j, : len(row["labels"])] = row["labels"]
    return {"input_ids": ids, "labels": labels}


class PerToken(nn.Module):
    """Embedding → two residual MLP blocks → logits: work and activations per padded token."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
            for _ in range(2)
        )
        self.out = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block(h)
        logits: torch.Tensor = self.out(h)
        return logits


@dataclass
class Measure:
    """What one run saw."""

    loss_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    oom_retries: int = 0
    micro_batch: str = ""
    per_step: tuple[float, ...] = ()

    @property
    def padding_share(self) -> float:
        return self.padded_tokens / max(1, self.loss_tokens) - 1

    @property
    def tokens_per_s(self) -> float:
        return self.loss_tokens / self.seconds if self.seconds else 0.0

    @property
    def spread(self) -> float:
        full = self.per_step[:-1] or self.per_step  # the epoch's last window may be short
        return max(full) - min(full) if full else 0.0


class Loss:
    """The next-token loss over the labels that are not ignored; counts what it trains on."""

    def __init__(self, measure: Measure) -> None:
        self.measure = measure

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["input_ids"])
        if torch.is_grad_enabled():
            self.measure.padded_tokens += batch["input_ids"].numel()
            self.measure.loss_tokens += int((batch["labels"] != IGNORE).sum())
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=IGNORE
        )


class PerStep(autoaccum.Callback):
    """Each step's loss tokens; the clock and the padded tokens from the first step on (the
    probe's trials are not training)."""

    def __init__(self, measure: Measure) -> None:
        self.measure, self.last, self.started = measure, 0.0, 0.0

    def on_train_start(self, run: autoaccum.RunView) -> None:
        self.measure.padded_tokens = 0
        self.started = time.perf_counter()

    def on_train_end(self, run: autoaccum.RunView) -> None:
        self.measure.seconds = time.perf_counter() - self.started

    def on_step(self, run: autoaccum.RunView) -> None:
        seen = run.state().items_seen
        self.measure.per_step = (*self.measure.per_step, seen - self.last)
        self.last = seen


def one_run(kind: str, args: argparse.Namespace, data: Texts, tokens: int, batch: int) -> Measure:
    measure = Measure()
    inner = PerToken(args.vocab, args.width)
    model = MemoryBudget(inner, args.budget_mib * 2**20, training_bytes(inner))
    target: dict[str, Any] = (
        {"target_tokens": tokens} if kind == "tokens" else {"target_batch": batch}
    )
    loader = DataLoader(data, batch_size=8, collate_fn=collate, shuffle=True)
    torch.manual_seed(1)
    result = autoaccum.fit(
        model,
        loader,
        **target,
        loss_fn=Loss(measure),
        count_fn=autoaccum.count_tokens(shift=False),
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        margin=0.0,
        progress=False,
        report=False,
        callbacks=[PerStep(measure)],
    )
    measure.loss_tokens = int(result.items_seen)  # the epoch's (the probe's trials aside)
    measure.steps, measure.oom_retries = result.optimizer_steps, result.oom_retries
    measure.micro_batch = result.plan.describe()
    return measure


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--median", type=float, default=128.0)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--target-tokens", type=int, default=16384)
    p.add_argument("--budget-mib", type=float, default=96.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="a smoke run in seconds, not a figure")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args(argv)
    if args.tiny:
        args.samples, args.context, args.median, args.target_tokens = 192, 64, 12.0, 512
        args.budget_mib, args.repeats = 4.0, 1
    torch.set_num_threads(1)
    spec = LengthSpec(context=args.context, median=args.median, min_len=2, vocab=args.vocab)
    data = Texts(spec, args.samples)
    mean_tokens = float(data.tokens.lengths.double().mean())
    batch = max(1, round(args.target_tokens / mean_tokens))
    runs: dict[str, list[Measure]] = {"fixed": [], "tokens": []}
    for _ in range(args.repeats):  # alternated: the machine's load falls on both alike
        for kind in runs:
            runs[kind].append(one_run(kind, args, data, args.target_tokens, batch))
    out = {kind: asdict(measures[0]) for kind, measures in runs.items()}
    for kind, measures in runs.items():
        out[kind]["tokens_per_s"] = statistics.median(m.tokens_per_s for m in measures)
        out[kind]["padding_share"] = measures[0].padding_share
        out[kind]["spread"] = measures[0].spread
    out["ratio"] = out["tokens"]["tokens_per_s"] / out["fixed"]["tokens_per_s"]
    out["settings"] = {k: str(v) for k, v in vars(args).items()} | {"target_batch": batch}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_tokens.json").write_text(json.dumps(out, indent=2))
    print(f"{'':8} {'padding':>8} {'tokens/s':>10} {'spread':>7} {'OOM':>4}  plan")
    for kind in runs:
        r = out[kind]
        print(
            f"{kind:8} {r['padding_share']:8.1%} {r['tokens_per_s']:10,.0f} "
            f"{r['spread']:7.0f} {r['oom_retries']:4}  {r['micro_batch']}"
        )
    print(f"tokens/s, token budget over fixed samples: {out['ratio']:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
