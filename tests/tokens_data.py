"""Variable-length token rows for the token-budget tests: seeded dict samples of input ids and
labels (some ignored), a padding collate, a tiny causal LM in float64, its shifted loss, and the
reference: one big step per T loss tokens of the token stream (a sample split where it
crosses)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

VOCAB = 13
LR = 0.5


class Rows(Dataset[dict[str, torch.Tensor]]):
    """``n`` rows of 2 to 11 tokens, about a fifth of their labels ignored (-100)."""

    def __init__(self, n: int = 30, seed: int = 1) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            length = int(torch.randint(2, 12, (1,), generator=gen))
            ids = torch.randint(0, VOCAB, (length,), generator=gen)
            labels = ids.clone()
            labels[torch.rand(length, generator=gen) < 0.2] = -100
            self.rows.append({"input_ids": ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


def collate(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad to the longest row (labels of padding: -100)."""
    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    labels = torch.full((len(rows), longest), -100)
    for j, row in enumerate(rows):
        ids[j, : len(row["input_ids"])] = row["input_ids"]
        labels[j, : len(row["labels"])] = row["labels"]
    return {"input_ids": ids, "labels": labels}


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.out = nn.Linear(8, VOCAB)
        self.double()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(torch.tanh(self.embed(input_ids)))
        return out


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean over the loss tokens: position t predicts label t + 1 (shifted)."""
    logits = model(batch["input_ids"])
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )


def stream(rows: Rows, order: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """The epoch's loss tokens, as (row, position), in the rows' order."""
    out = []
    for i in order if order is not None else range(len(rows)):
        labels = rows.rows[i]["labels"]
        out += [(i, p) for p in range(1, len(labels)) if labels[p] != -100]
    return out


def reference(model: nn.Module, rows: Rows, targets: Sequence[int], order: Any = None) -> None:
    """One SGD step per window of ``targets[k]`` tokens of the stream, the mean over them."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tokens, start = stream(rows, order), 0
    for target in targets:
        window = tokens[start : start + target]
        start += target
        if not window:
            break
        loss = sum(
            F.cross_entropy(
                model(rows.rows[i]["input_ids"][None])[0, p - 1 : p],
                rows.rows[i]["labels"][p : p + 1],
            )
            for i, p in window
        )
        (loss / len(window)).backward()
        opt.step()
        opt.zero_grad()
