"""Batch trees: what counts as a sample, and how batches are measured, cut and joined —
tensors, dicts, (named) tuples, dataclasses, Hugging Face ``datasets`` dict-of-lists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import pytest
import torch

from autoaccum.errors import BatchError
from autoaccum.train.batches import (
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
