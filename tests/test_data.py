"""Windows from DataLoaders and plain iterables: exact sizes, order, collation, sharding."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    Sampler,
    TensorDataset,
)

from autoaccum.data import Window, WindowStream
from autoaccum.errors import BatchError, ConfigError
from autoaccum.plan import make_plan


def ids_of(window: Window) -> list[int]:
    """The sample ids of a window whose micro-batches are ``(ids,)`` tuples or tensors."""
    out: list[int] = []
    for micro in window.micro_batches:
        tensor = micro[0] if isinstance(micro, (tuple, list)) else micro
        out.extend(tensor.tolist())
    return out


def micro_sizes(window: Window) -> tuple[int, ...]:
    return tuple(len(m[0] if isinstance(m, (tuple, list)) else m) for m in window.micro_batches)


def ids_dataset(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n))


class Sequences(Dataset[tuple[int, torch.Tensor]]):
    """Sample i is a sequence of ``lengths[i]`` copies of i (variable length)."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, torch.full((self.lengths[i],), i)


def pad_collate(samples: list[tuple[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of *this* batch, as padding collate_fns do."""
    longest = max(len(seq) for _, seq in samples)
    tokens = torch.zeros(len(samples), longest, dtype=torch.long)
    for row, (_, seq) in enumerate(samples):
        tokens[row, : len(seq)] = seq
    return {
        "ids": torch.tensor([i for i, _ in samples]),
        "tokens": tokens,
        "lengths": torch.tensor([len(seq) for _, seq in samples]),
    }


# ---------------------------------------------------------------- DataLoader


def test_loader_windows_hold_target_samples_in_sampler_order() -> None:
    loader = DataLoader(ids_dataset(600), batch_size=32)
    stream = WindowStream(loader)
    plan = make_plan(256, 100)
    windows = list(stream.windows(plan, 0))

    assert stream.is_loader
    assert [w.index for w in windows] == [0, 1, 2]
    assert [w.samples for w in windows] == [256, 256, 88]
    assert micro_sizes(windows[0]) == (86, 85, 85)
    assert micro_sizes(windows[1]) == (86, 85, 85)
    assert micro_sizes(windows[2]) == plan.window_sizes(88) == (44, 44)
    assert [i for w in windows for i in ids_of(w)] == list(range(600))
    assert stream.samples_per_epoch() == 600
    assert stream.num_windows(plan) == 3


def test_loader_batch_size_and_drop_last_are_ignored() -> None:
    loader = DataLoader(ids_dataset(50), batch_size=7, drop_last=True)
    windows = list(WindowStream(loader).windows(make_plan(20, 8), 0))
    assert [w.samples for w in windows] == [20, 20, 10]
    assert [i for w in windows for i in ids_of(w)] == list(range(50))


def test_loader_without_auto_collation_is_batched_by_default_collate() -> None:
    loader = DataLoader(torch.arange(10).float(), batch_size=None)
    (window,) = WindowStream(loader).windows(make_plan(10, 4), 0)
    assert [m.tolist() for m in window.micro_batches] == [
        [0.0, 1.0, 2.0, 3.0],
        [4.0, 5.0, 6.0],
        [7.0, 8.0, 9.0],
    ]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_micro_batch_is_collated_on_its_own(num_workers: int) -> None:
    lengths = [1, 9, 2, 3, 1, 2, 7, 1, 1, 4, 5, 2, 1]
    loader = DataLoader(
        Sequences(lengths),
        batch_size=13,
        collate_fn=pad_collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    stream = WindowStream(loader)
    plan = make_plan(6, 2)  # windows 6, 6, 1; micro-batches of 2
    for epoch in range(2):  # twice, so persistent workers serve a second epoch
        windows = list(stream.windows(plan, epoch))
        assert [w.samples for w in windows] == [6, 6, 1]
        seen: list[int] = []
        for window in windows:
            for micro in window.micro_batches:
                ids = micro["ids"].tolist()
                seen.extend(ids)
                assert micro["tokens"].shape == (len(ids), max(lengths[i] for i in ids))
                assert micro["lengths"].tolist() == [lengths[i] for i in ids]
        assert seen == list(range(13))


def test_shuffle_gives_the_user_loaders_permutation_every_epoch() -> None:
    loader = DataLoader(ids_dataset(40), batch_size=8, shuffle=True)

    torch.manual_seed(0)
    expected = [torch.cat([b[0] for b in loader]).tolist() for _ in range(3)]
    after_user = torch.rand(1)

    torch.manual_seed(0)
    stream = WindowStream(loader)
    plan = make_plan(16, 5)
    got = [[i for w in stream.windows(plan, e) for i in ids_of(w)] for e in range(3)]
    after_stream = torch.rand(1)

    assert got == expected
    assert expected[0] != expected[1]
    assert torch.equal(after_user, after_stream)  # the global RNG advanced as much


def test_shuffle_with_a_loader_generator_matches_the_user_loader() -> None:
    loader = DataLoader(ids_dataset(30), batch_size=4, shuffle=True, generator=torch.Generator())
    loader.generator.manual_seed(7)
    expected = [torch.cat([b[0] for b in loader]).tolist() for _ in range(2)]
    loader.generator.manual_seed(7)
    stream = WindowStream(loader)
    got = [[i for w in stream.windows(make_plan(9, 4), e) for i in ids_of(w)] for e in range(2)]
    assert got == expected


def test_sample_batch_is_one_collate_call_over_the_start_of_epoch_0() -> None:
    calls: list[int] = []

    def counting_collate(samples: list[tuple[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
        calls.append(len(samples))
        return pad_collate(samples)

    lengths = [3, 1, 4, 1, 5, 9, 2, 6]
    loader = DataLoader(Sequences(lengths), batch_size=2, shuffle=True, collate_fn=counting_collate)
    torch.manual_seed(1)
    stream = WindowStream(loader)
    probe = stream.sample_batch(5)
    assert calls == [5]
    first = list(stream.windows(make_plan(8, 8), 0))
    assert first[0].micro_batches[0]["ids"].tolist()[:5] == probe["ids"].tolist()
    assert probe["tokens"].shape == (5, max(lengths[i] for i in probe["ids"].tolist()))


def test_sample_batch_larger_than_the_data_returns_all_of_it() -> None:
    stream = WindowStream(DataLoader(ids_dataset(6), batch_size=4))
    assert stream.sample_batch(100)[0].tolist() == list(range(6))
    listed = WindowStream([torch.arange(4), torch.arange(4, 7)])
    assert listed.sample_batch(100).tolist() == list(range(7))
    assert listed.sample_batch(5).tolist() == list(range(5))


def test_distributed_window_k_is_global_samples_k_target_to_k_plus_1_target() -> None:
    target, n = 20, 110
    plan = make_plan(target, 4, world_size=2)  # 10 per rank: 4, 3, 3
    loader = DataLoader(ids_dataset(n), batch_size=16)
    per_rank = [list(WindowStream(loader, rank=r, world_size=2).windows(plan, 0)) for r in (0, 1)]
    assert [len(ws) for ws in per_rank] == [6, 6]
    for k in range(6):
        windows = [per_rank[r][k] for r in (0, 1)]
        union = sorted(i for w in windows for i in ids_of(w))
        assert union == list(range(k * target, min((k + 1) * target, n)))
        assert ids_of(windows[1]) == [i + 1 for i in ids_of(windows[0])]  # striding
    assert micro_sizes(per_rank[0][0]) == (4, 3, 3)
    assert per_rank[0][5].samples == 5


def test_distributed_shuffle_builds_a_seeded_sampler_that_changes_per_epoch() -> None:
    loader = DataLoader(ids_dataset(40), batch_size=8, shuffle=True)
    plan = make_plan(10, 5, world_size=2)
    streams = [WindowStream(loader, rank=r, world_size=2, seed=3) for r in (0, 1)]

    def epoch(e: int) -> list[list[int]]:
        return [[i for w in s.windows(plan, e) for i in ids_of(w)] for s in streams]

    e0, e1 = epoch(0), epoch(1)
    assert sorted(e0[0] + e0[1]) == list(range(40))
    assert sorted(e1[0] + e1[1]) == list(range(40))
    assert e0 != e1
    assert e0[0] != list(range(0, 40, 2))  # shuffled, not sequential
    again = WindowStream(loader, rank=0, world_size=2, seed=3)
    assert [i for w in again.windows(plan, 1) for i in ids_of(w)] == e1[0]


def test_a_users_distributed_sampler_is_used_and_set_epoch_called() -> None:
    dataset = ids_dataset(24)
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=5)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler)
    stream = WindowStream(loader, rank=1, world_size=2)
    got = [i for w in stream.windows(make_plan(8, 4, world_size=2), 3) for i in ids_of(w)]
    assert sampler.epoch == 3
    reference = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=5)
    reference.set_epoch(3)
    assert got == list(reference)
    assert stream.samples_per_epoch() == 12


def test_a_distributed_sampler_for_another_rank_is_a_config_error() -> None:
    dataset = ids_dataset(8)
    sampler = DistributedSampler(dataset, num_replicas=2, rank=0)
    with pytest.raises(ConfigError, match="rank 0 of 2"):
        WindowStream(DataLoader(dataset, sampler=sampler), rank=1, world_size=2)


class Reversed(Sampler[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n - 1, -1, -1))

    def __len__(self) -> int:
        return self.n


class Buckets(Sampler[list[int]]):
    """A bucketing batch sampler: groups of uneven size, in its own order."""

    def __iter__(self) -> Iterator[list[int]]:
        return iter([[5, 4], [0, 1, 2], [3]])

    def __len__(self) -> int:
        return 3


def test_a_custom_sampler_is_followed_in_a_single_process() -> None:
    loader = DataLoader(ids_dataset(9), batch_size=2, sampler=Reversed(9))
    windows = list(WindowStream(loader).windows(make_plan(4, 4), 0))
    assert [ids_of(w) for w in windows] == [[8, 7, 6, 5], [4, 3, 2, 1], [0]]


def test_a_custom_sampler_in_a_distributed_run_is_a_config_error() -> None:
    loader = DataLoader(ids_dataset(9), sampler=Reversed(9))
    with pytest.raises(ConfigError, match="DistributedSampler"):
        WindowStream(loader, rank=0, world_size=2)


def test_a_custom_batch_sampler_is_flattened_in_a_single_process() -> None:
    stream = WindowStream(DataLoader(ids_dataset(6), batch_sampler=Buckets()))
    windows = list(stream.windows(make_plan(4, 2), 0))
    assert [ids_of(w) for w in windows] == [[5, 4, 0, 1], [2, 3]]
    assert micro_sizes(windows[0]) == (2, 2)
    assert stream.samples_per_epoch() is None
    with pytest.raises(ConfigError, match="batch_sampler"):
        WindowStream(DataLoader(ids_dataset(6), batch_sampler=Buckets()), world_size=2)


def test_a_plain_batch_sampler_contributes_its_samplers_order() -> None:
    batch_sampler = BatchSampler(Reversed(5), batch_size=2, drop_last=True)
    stream = WindowStream(DataLoader(ids_dataset(5), batch_sampler=batch_sampler))
    assert [i for w in stream.windows(make_plan(3, 3), 0) for i in ids_of(w)] == [4, 3, 2, 1, 0]


@pytest.mark.parametrize(("rank", "world_size"), [(0, 0), (2, 2), (-1, 2), (0, 1.5), (True, 2)])
def test_invalid_rank_or_world_size_is_a_config_error(rank: Any, world_size: Any) -> None:
    with pytest.raises(ConfigError):
        WindowStream([torch.ones(2)], rank=rank, world_size=world_size)


def test_a_plan_for_another_world_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="world_size"):
        WindowStream([torch.ones(4)], world_size=1).windows(make_plan(4, 2, world_size=2), 0)


def test_an_empty_loader_is_a_batch_error() -> None:
    stream = WindowStream(DataLoader(ids_dataset(0)))
    with pytest.raises(BatchError, match="yielded no samples"):
        list(stream.windows(make_plan(4, 2), 0))
    with pytest.raises(BatchError, match="yielded no samples"):
        stream.sample_batch(4)


# ----------------------------------------------------------------- iterables


def test_odd_batches_are_rechunked_into_exact_windows() -> None:
    sizes = [7, 3, 11, 1, 13, 5]
    data, start = [], 0
    for size in sizes:
        data.append(torch.arange(start, start + size))
        start += size
    stream = WindowStream(data)
    plan = make_plan(16, 6)  # 6, 5, 5
    windows = list(stream.windows(plan, 0))

    assert not stream.is_loader
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
    (window,) = WindowStream(dicts).windows(make_plan(9, 4), 0)
    assert [m["x"].tolist() for m in window.micro_batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert all(m["y"].shape == (3, 2) for m in window.micro_batches)

    tuples = [
        (torch.arange(5), torch.arange(5) * 10),
        (torch.arange(5, 7), torch.arange(5, 7) * 10),
    ]
    windows = list(WindowStream(tuples).windows(make_plan(4, 2), 0))
    assert [w.samples for w in windows] == [4, 3]
    for window in windows:
        for x, y in window.micro_batches:
            assert torch.equal(y, x * 10)


def test_a_generator_is_replayed_after_sample_batch_and_then_exhausted() -> None:
    def batches() -> Iterator[torch.Tensor]:
        yield torch.arange(0, 3)
        yield torch.arange(3, 8)
        yield torch.arange(8, 10)

    stream = WindowStream(batches())
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

    stream = WindowStream(DataLoader(Stream(), batch_size=3))
    assert not stream.is_loader
    windows = list(stream.windows(make_plan(4, 2), 0))
    assert [w.samples for w in windows] == [4, 4, 2]


def test_ragged_batches_spanning_a_micro_batch_are_a_batch_error() -> None:
    data = [torch.zeros(3, 4), torch.zeros(3, 5)]
    with pytest.raises(BatchError, match="different shapes"):
        list(WindowStream(data).windows(make_plan(6, 6), 0))


@pytest.mark.parametrize("data", [[], iter([]), [torch.zeros(0, 3)]])
def test_empty_data_is_a_batch_error(data: Any) -> None:
    with pytest.raises(BatchError, match="yielded no samples"):
        list(WindowStream(data).windows(make_plan(4, 2), 0))


def test_a_batch_without_tensors_is_a_batch_error_naming_its_index() -> None:
    with pytest.raises(BatchError, match="batch 1 of the data"):
        list(WindowStream([torch.ones(3), "oops"]).windows(make_plan(2, 2), 0))


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
            list(WindowStream(data).windows(plan, 0))
        return
    windows = list(WindowStream(data).windows(plan, 0))
    micro = [m for w in windows for m in w.micro_batches]
    assert torch.cat(micro).tolist() == list(range(start))
    assert [w.index for w in windows] == list(range(len(windows)))
    for window in windows[:-1]:
        assert window.samples == plan.per_rank
        assert tuple(len(m) for m in window.micro_batches) == plan.micro_sizes
    last = windows[-1]
    assert 0 < last.samples <= plan.per_rank
    assert tuple(len(m) for m in last.micro_batches) == plan.window_sizes(last.samples)
