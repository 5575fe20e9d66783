"""Windows from any other iterable of batches: re-chunked along dim 0, exact sizes, order
kept, a generator replayed after the probe's sample, the errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from helpers import bn_net
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import LR, ce, token_model
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, IterableDataset

import autoaccum
from autoaccum.errors import BatchError
from autoaccum.plan import make_plan
from autoaccum.train.data import window_source
from autoaccum.train.data.loader import LoaderWindows


def test_odd_batches_are_rechunked_into_exact_windows() -> None:
    sizes = [7, 3, 11, 1, 13, 5]
    data, start = [], 0
    for size in sizes:
        data.append(torch.arange(start, start + size))
        start += size
    stream = window_source(data)
    plan = make_plan(16, 6)  # 6, 5, 5
    windows = list(stream.windows(plan, 0))

    assert not isinstance(stream, LoaderWindows)
    assert [w.samples for w in windows] == [16, 16, 8]
    assert [tuple(len(m) for m in w.micro_batches) for w in windows] == [
        (6, 5, 5),
        (6, 5, 5),
        plan.window_sizes(8),
    ]
    assert torch.cat([m for w in windows for m in w.micro_batches]).tolist() == list(range(40))
    assert stream.samples_per_epoch() == 40
    assert stream.num_windows(plan) == 3
    assert len(list(stream.windows(plan, 1))) == 3  # a list is iterated again each epoch


def test_dict_and_tuple_batches_keep_their_structure() -> None:
    dicts = [{"x": torch.arange(i, i + 3), "y": torch.zeros(3, 2)} for i in (0, 3, 6)]
    (window,) = window_source(dicts).windows(make_plan(9, 4), 0)
    assert [m["x"].tolist() for m in window.micro_batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert all(m["y"].shape == (3, 2) for m in window.micro_batches)

    tuples = [
        (torch.arange(5), torch.arange(5) * 10),
        (torch.arange(5, 7), torch.arange(5, 7) * 10),
    ]
    windows = list(window_source(tuples).windows(make_plan(4, 2), 0))
    assert [w.samples for w in windows] == [4, 3]
    for window in windows:
        for x, y in window.micro_batches:
            assert torch.equal(y, x * 10)


def test_a_generator_is_replayed_after_sample_batch_and_then_exhausted() -> None:
    def batches() -> Iterator[torch.Tensor]:
        yield torch.arange(0, 3)
        yield torch.arange(3, 8)
        yield torch.arange(8, 10)

    stream = window_source(batches())
    assert stream.sample_batch(4).tolist() == [0, 1, 2, 3]
    assert stream.samples_per_epoch() is None
    plan = make_plan(4, 4)
    windows = list(stream.windows(plan, 0))
    assert [m.tolist() for w in windows for m in w.micro_batches] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]
    assert list(stream.windows(plan, 1)) == []


def test_an_iterable_dataset_loader_is_rechunked_not_rebatched() -> None:
    class Stream(IterableDataset[torch.Tensor]):
        def __iter__(self) -> Iterator[torch.Tensor]:
            return iter(torch.arange(10))

    stream = window_source(DataLoader(Stream(), batch_size=3))
    assert not isinstance(stream, LoaderWindows)
    windows = list(stream.windows(make_plan(4, 2), 0))
    assert [w.samples for w in windows] == [4, 4, 2]


def test_ragged_batches_spanning_a_micro_batch_are_a_batch_error() -> None:
    data = [torch.zeros(3, 4), torch.zeros(3, 5)]
    with pytest.raises(BatchError, match="different shapes"):
        list(window_source(data).windows(make_plan(6, 6), 0))


@pytest.mark.parametrize("data", [[], iter([]), [torch.zeros(0, 3)]])
def test_empty_data_is_a_batch_error(data: Any) -> None:
    with pytest.raises(BatchError, match="yielded no samples"):
        list(window_source(data).windows(make_plan(4, 2), 0))


def test_a_batch_without_tensors_is_a_batch_error_naming_its_index() -> None:
    with pytest.raises(BatchError, match="batch 1 of the data"):
        list(window_source([torch.ones(3), "oops"]).windows(make_plan(2, 2), 0))


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=12),
    target=st.integers(min_value=1, max_value=20),
    max_micro=st.integers(min_value=1, max_value=20),
)
def test_rechunking_reproduces_the_data_in_order(
    sizes: list[int], target: int, max_micro: int
) -> None:
    data, start = [], 0
    for size in sizes:
        data.append(torch.arange(start, start + size))
        start += size
    plan = make_plan(target, max_micro)
    if start == 0:
        with pytest.raises(BatchError):
            list(window_source(data).windows(plan, 0))
        return
    windows = list(window_source(data).windows(plan, 0))
    micro = [m for w in windows for m in w.micro_batches]
    assert torch.cat(micro).tolist() == list(range(start))
    assert [w.index for w in windows] == list(range(len(windows)))
    for window in windows[:-1]:
        assert window.samples == plan.per_rank
        assert tuple(len(m) for m in window.micro_batches) == plan.micro_sizes
    last = windows[-1]
    assert 0 < last.samples <= plan.per_rank
    assert tuple(len(m) for m in last.micro_batches) == plan.window_sizes(last.samples)


def test_a_one_sample_tail_on_a_batchnorm_model_is_counted_on_every_path() -> None:
    """A list of batches whose last window would hold one sample: BatchNorm cannot train on
    it, so it is left out — with the same warning and count as the DataLoader path."""
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    batches = [(x[i : i + 3], y[i : i + 3]) for i in range(0, 15, 3)] + [(x[15:], y[15:])]
    with pytest.warns(UserWarning, match="1 sample\\(s\\) of window 3 of epoch 0 were not"):
        result = autoaccum.fit(
            bn_net(), batches, 5, loss_fn=ce, max_micro=5, progress=False, report=False
        )
    assert result.samples_dropped == 1
    assert result.samples_seen == 15


def _padded_token_ce(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """A token loss over ragged rows, padded here: what a user writes for such batches."""
    inputs = pad_sequence(list(batch["input_ids"]), batch_first=True)
    labels = pad_sequence(list(batch["labels"]), batch_first=True, padding_value=-100)
    logits = model(inputs)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def _ragged_rows(n: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 9, (n,), generator=gen).tolist()
    return [
        {
            "input_ids": torch.randint(0, 11, (k,), generator=gen),
            "labels": torch.randint(0, 11, (k,), generator=gen),
        }
        for k in lengths
    ]


def _batched(rows: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """Rows batched the way ``datasets`` does in torch format: ragged columns as lists."""
    out = []
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        out.append({k: [r[k] for r in chunk] for k in chunk[0]})
    return out


def _fit_ragged(batches: list[dict[str, Any]], target: int) -> list[torch.Tensor]:
    model = token_model()
    autoaccum.fit(
        model,
        batches,
        target,
        loss_fn=_padded_token_ce,
        count_fn=autoaccum.count_tokens("labels", shift=False),
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        max_micro=3,
        progress=False,
        report=False,
    )
    return [p.detach() for p in model.parameters()]


def test_ragged_torch_format_batches_train_token_exactly() -> None:
    """Ragged rows (lists of 1-d tensors, as ``datasets`` gives them in torch format) are
    re-chunked into exact windows and weighted by their tokens: the parameters land on
    full-window SGD over the same tokens, whatever the source batching."""
    rows = _ragged_rows(23)
    got = _fit_ragged(_batched(rows, 5), 8)
    ref = token_model()
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for i in range(0, 23, 8):
        window = _batched(rows[i : i + 8], 8)[0]
        _padded_token_ce(ref, window).backward()
        opt.step()
        opt.zero_grad()
    for p, q in zip(got, ref.parameters(), strict=True):
        torch.testing.assert_close(p, q.detach(), rtol=1e-10, atol=1e-12)
    for p, q in zip(_fit_ragged(_batched(rows, 7), 8), got, strict=True):  # other source batches
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_real_datasets_batches_in_torch_format_train() -> None:
    datasets = pytest.importorskip("datasets")
    rows = _ragged_rows(23)
    table = datasets.Dataset.from_dict(
        {k: [r[k].tolist() for r in rows] for k in ("input_ids", "labels")}
    )
    batches = list(table.with_format("torch").iter(batch_size=5))
    assert isinstance(batches[0]["labels"], list)  # ragged: a list of tensors
    assert all(
        torch.equal(p, q)
        for p, q in zip(_fit_ragged(batches, 8), _fit_ragged(_batched(rows, 5), 8), strict=True)
    )
