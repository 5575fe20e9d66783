"""A tiny GPT-2 trained with a token budget: every optimizer step exactly T loss tokens.

    python examples/gpt2_token_budget.py

A ``GPT2LMHeadModel`` built from a config (no download) on 300 texts of 4 to 120 tokens
(log-normal lengths). ``fit(..., target_tokens=1024)`` cuts the epoch's token stream into
windows of exactly 1024 loss tokens: the text that crosses a window's budget is split by masking
its labels, and opens the next window with the rest. Micro-batches are packed by length under a
probed budget of padded tokens. Then the same with ``autoaccum.Ramp(256, 1024, 4)``: the target
grows over the first 4 steps, each step exact at its size. The page "Token budgets and
schedules" of the docs explains it all.

Each sample carries its own ``labels``: that is what lets a window mask part of a sample. (A
collate that builds the labels from ``input_ids`` would give windows of whole samples instead.)
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

import autoaccum

VOCAB = 64


def make_texts(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Texts of 4 to 120 tokens (log-normal, median about 27), each token 3 past the last."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        length = min(120, max(4, round(rng.lognormvariate(3.3, 0.7))))
        start = rng.randrange(VOCAB)
        ids = torch.tensor([(start + 3 * k) % VOCAB for k in range(length)])
        texts.append({"input_ids": ids, "labels": ids.clone()})  # labels the windows can mask
    return texts


def pad(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad to the longest row of the micro-batch; padding is no loss token (-100)."""
    longest = max(len(row["input_ids"]) for row in rows)
    batch = {
        "input_ids": torch.zeros(len(rows), longest, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), longest, dtype=torch.long),
        "labels": torch.full((len(rows), longest), -100),
    }
    for j, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][j, :n] = row["input_ids"]
        batch["attention_mask"][j, :n] = 1
        batch["labels"][j, :n] = row["labels"]
    return batch


class Tokens(autoaccum.Callback):
    """Each step's target and the loss tokens it trained, over all ranks."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []
        self.seen = 0.0

    def on_step(self, run: autoaccum.RunView) -> None:
        state = run.state()
        self.steps.append((state.target, round(state.items_seen - self.seen)))
        self.seen = state.items_seen


def make_model() -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def exact(steps: list[tuple[int, int]], epoch_tokens: int) -> bool:
    """Every step trained its target, but each epoch's last, which held what was left."""
    done, ok = 0, True
    for target, trained in steps:
        left = epoch_tokens - done % epoch_tokens
        ok &= trained == min(target, left)
        done += trained
    return ok


def main() -> None:
    texts = make_texts(300, seed=0)
    epoch_tokens = sum(len(t["labels"]) - 1 for t in texts)  # GPT-2 shifts: n − 1 per text
    torch.manual_seed(0)
    loader = DataLoader(texts, batch_size=8, shuffle=True, collate_fn=pad)

    model = make_model()
    tokens = Tokens()
    result = autoaccum.fit(model, loader, target_tokens=1024, callbacks=[tokens], progress=False)
    print(f"loss tokens per step: {[trained for _, trained in tokens.steps]}")
    print(
        f"{result.samples_seen} samples for {len(texts)} texts (one crossing a window's budget is "
        f"trained in two parts and counted once), {result.items_seen:.0f} of {epoch_tokens} "
        "loss tokens"
    )

    ramp = autoaccum.Ramp(256, 1024, 4)
    model = make_model()
    ramped = Tokens()
    result = autoaccum.fit(
        model, loader, target_tokens=ramp, epochs=2, callbacks=[ramped], report=False
    )
    print(f"{ramp}: targets     {[target for target, _ in ramped.steps]}")
    print(f"{' ' * len(repr(ramp))}  loss tokens {[trained for _, trained in ramped.steps]}")
    print(f"loss {result.losses[0]:.2f} → {result.losses[-1]:.2f}")

    ok = exact(tokens.steps, epoch_tokens) and exact(ramped.steps, epoch_tokens)
    print(f"every step trained exactly its target of loss tokens (an epoch's last, the rest): {ok}")
    if not ok:
        raise SystemExit("unexpected: a step did not train its target")


if __name__ == "__main__":
    main()
