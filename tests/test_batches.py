"""Batch trees: what counts as a sample, and how batches are measured, cut and joined —
tensors, dicts, (named) tuples, dataclasses, Hugging Face ``datasets`` dict-of-lists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import pytest
import torch

from autoaccum.errors import BatchError
from autoaccum.step.batches import (
    batch_size,
    concat_batches,
    resize_batch,
    slice_batch,
    split_batch,
    to_device,
)


@dataclass
class Features:
    input_ids: torch.Tensor
    labels: torch.Tensor
    source: str = "train"  # a constant, copied into every piece


@dataclass(frozen=True)
class Frozen:
    x: torch.Tensor
    names: list[str] = field(default_factory=list)


class Pair(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


def test_a_dataclass_batch_is_measured_cut_and_joined_like_a_dict() -> None:
    batch = Features(torch.arange(10).view(5, 2), torch.arange(5))
    assert batch_size(batch) == 5
    first, rest = split_batch(batch, [2, 3])
    assert isinstance(first, Features)
    assert first.labels.tolist() == [0, 1]
    assert rest.input_ids.shape == (3, 2)
    assert first.source == rest.source == "train"
    joined = concat_batches([first, rest])
    assert torch.equal(joined.input_ids, batch.input_ids)
    tiled = resize_batch(batch, 7)
    assert tiled.labels.tolist() == [0, 1, 2, 3, 4, 0, 1]
    frozen = Frozen(torch.ones(4, 3), ["a", "b", "c", "d"])
    assert slice_batch(frozen, 1, 3).names == ["b", "c"]
    assert to_device(frozen, torch.device("cpu")).x.shape == (4, 3)


def test_a_datasets_dict_of_lists_batch_counts_samples_not_tokens() -> None:
    """A Hugging Face ``datasets`` batch: ragged token lists per sample, one label each."""
    batch = {
        "input_ids": [[101, 7, 8, 102], [101, 9, 102], [101, 102]],
        "attention_mask": [[1, 1, 1, 1], [1, 1, 1], [1, 1]],
        "label": [0, 1, 1],
    }
    assert batch_size(batch) == 3
    head, tail = split_batch(batch, [1, 2])
    assert head == {"input_ids": [[101, 7, 8, 102]], "attention_mask": [[1, 1, 1, 1]], "label": [0]}
    assert concat_batches([head, tail]) == batch


def test_a_datasets_torch_format_batch_with_ragged_rows_counts_samples() -> None:
    """``datasets`` in torch format gives ragged columns as lists of 1-d tensors: one tensor
    per sample, not a tuple of batches; its slices stay per-sample (also where the lengths
    left happen to agree), a stacked batch joins as its rows, and each tensor moves."""
    lengths = (6, 3, 4, 3, 3)
    batch = {
        "input_ids": [torch.arange(n) for n in lengths],
        "labels": [torch.arange(n) for n in lengths],
        "score": torch.arange(5.0),
    }
    assert batch_size(batch) == 5
    head, tail = split_batch(batch, [2, 3])
    assert batch_size(tail) == 3  # three rows of 3 tokens: still 3 samples, not 3 tokens
    assert [t.tolist() for t in tail["labels"]] == [[0, 1, 2, 3], [0, 1, 2], [0, 1, 2]]
    joined = concat_batches([head, tail])
    assert [len(t) for t in joined["input_ids"]] == list(lengths)
    assert batch_size(concat_batches([tail, {k: v[:2] for k, v in tail.items()}])) == 5
    stacked = {"input_ids": torch.zeros(2, 3), "labels": torch.zeros(2, 3), "score": torch.ones(2)}
    assert batch_size(concat_batches([tail, stacked])) == 5
    assert batch_size(resize_batch(batch, 12)) == 12
    moved = to_device(batch, torch.device("cpu"))
    assert all(isinstance(t, torch.Tensor) for t in moved["input_ids"])
    # a list of batched tensors that agree on dim 0 is a structure, as before
    assert batch_size([torch.zeros(4, 3), torch.zeros(4)]) == 4


def test_a_named_tuple_keeps_its_type() -> None:
    pair = Pair(torch.arange(4), torch.arange(4) * 2)
    piece = slice_batch(pair, 1, 3)
    assert isinstance(piece, Pair)
    assert piece.y.tolist() == [2, 4]


def test_disagreeing_entries_are_named_in_the_error() -> None:
    batch = {"input_ids": torch.zeros(2, 5), "labels": torch.zeros(6)}
    with pytest.raises(BatchError, match=r"\['input_ids'\] has 2, \['labels'\] has 6"):
        batch_size(batch)


def test_a_batch_without_samples_says_what_a_batch_is() -> None:
    with pytest.raises(BatchError, match="no tensor and no per-sample list"):
        batch_size({"note": "nothing here"})
    with pytest.raises(BatchError, match="0-dimensional tensor at \\['loss_scale'\\]"):
        batch_size({"x": torch.zeros(3, 2), "loss_scale": torch.tensor(1.0)})


def test_ragged_tensors_point_to_a_map_style_dataset() -> None:
    with pytest.raises(BatchError, match="DataLoader over a map-style dataset"):
        concat_batches([torch.zeros(2, 4), torch.zeros(2, 6)])
