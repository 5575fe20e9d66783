"""What the default loss's mean is over: target tokens for Hugging Face causal LMs (their
labels shifted, as the model shifts them), read off the model itself; a warning where it
cannot be read. Exactness against full-window SGD in float64, with a negative control."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from reference import LR, rel_diff
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from transformers import GPT2Config, GPT2LMHeadModel

import autoaccum
from autoaccum.step.counting import DefaultCount

VOCAB = 40


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config).double()


class Texts(Dataset[list[int]]):
    """Token sequences of 2 to 12 tokens (variable length, seeded)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        lengths = torch.randint(2, 13, (n,), generator=gen).tolist()
        self.rows = [torch.randint(0, VOCAB, (k,), generator=gen).tolist() for k in lengths]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[int]:
        return self.rows[i]


def pad(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-pad to this batch's longest row; padding is masked and ignored (-100)."""
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def full_window_sgd(model: nn.Module, data: Texts, target: int) -> None:
    """The reference: each window as one batch, the model's own (token-mean) loss."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for start in range(0, len(data), target):
        model(
            **pad([data[i] for i in range(start, min(start + target, len(data)))])
        ).loss.backward()
        opt.step()
        opt.zero_grad()


def fit_gpt2(model: nn.Module, data: Texts, target: int, **kwargs: Any) -> autoaccum.FitResult:
    return autoaccum.fit(
        model,
        DataLoader(data, batch_size=5, collate_fn=pad),
        target,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        max_micro=3,
        device="cpu",
        progress=False,
        report=False,
        **kwargs,
    )


def test_a_causal_lm_is_weighted_by_its_shifted_target_tokens_by_default() -> None:
    data = Texts(21)
    model, ref = gpt2(), gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shift is read off the model: nothing to warn
        fit_gpt2(model, data, 8)  # windows 8, 8, 5; micro-batches 3+3+2, padded each
    full_window_sgd(ref, data, 8)
    # Hugging Face computes its loss in float32 even for a float64 model (ForCausalLMLoss
    # upcasts the logits with .float()), so micro-batch means carry float32 rounding (~1e-7):
    # the weights match to that, four orders of magnitude inside the control's 1e-4 miss.
    assert rel_diff(model, ref) < 1e-6


def test_weighting_a_causal_lm_by_samples_misses_the_full_window_step() -> None:
    """Negative control: the same run weighted by samples (what the default did before)."""
    data = Texts(21)
    model, ref = gpt2(), gpt2()
    fit_gpt2(model, data, 8, count_fn=lambda batch: len(batch["input_ids"]))
    full_window_sgd(ref, data, 8)
    assert rel_diff(model, ref) > 1e-4


def test_the_shift_is_read_off_the_model() -> None:
    batch = pad([[1, 2, 3, 4], [5, 6]])
    count = DefaultCount()
    count.prepare(gpt2(), batch)
    assert (count.shift, count.how) == (True, "read off the model's loss")
    assert int(count(batch)) == 3 + 1  # the first label of each row is never a target


class Tagger(nn.Module):
    """Hugging Face-style token classification: a loss over every label, none shifted."""

    def __init__(self, smoothing: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.smoothing = smoothing

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **_: Any) -> Any:
        logits = self.embed(input_ids)
        loss = F.cross_entropy(
            logits.reshape(-1, 8),
            labels.reshape(-1),
            ignore_index=-100,
            label_smoothing=self.smoothing,
        )
        return type("Out", (), {"loss": loss, "logits": logits})()


def test_an_unshifted_token_loss_counts_every_label() -> None:
    batch = {
        "input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]]),
        "labels": torch.tensor([[1, 2, 3], [4, 5, -100]]),
    }
    count = DefaultCount()
    count.prepare(Tagger(), batch)
    assert count.shift is False
    assert int(count(batch)) == 5


def test_where_the_loss_cannot_be_read_one_warning_says_what_was_assumed() -> None:
    batch = {
        "input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]]),
        "labels": torch.tensor([[1, 2, 3], [4, 5, 7]]),
    }
    count = DefaultCount()
    with pytest.warns(UserWarning, match="assumed not shifted .* pass count_fn"):
        count.prepare(Tagger(smoothing=0.3), batch)
    assert count.shift is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        count.prepare(Tagger(smoothing=0.3), batch)  # once


def test_dict_batches_without_labels_are_counted_in_samples_with_a_warning() -> None:
    count = DefaultCount()
    with pytest.warns(UserWarning, match="no 'labels'"):
        count.prepare(nn.Linear(2, 2), {"x": torch.zeros(3, 2)})
    assert count({"x": torch.zeros(3, 2)}) == 3
