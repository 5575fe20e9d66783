"""Windows from a DataLoader over a map-style dataset: exact sizes, sampler order, collation
per micro-batch, the user's permutation, sharding across ranks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from samples_data import Sequences, ids_dataset, ids_of, micro_sizes, pad_collate
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
)

import autoaccum
from autoaccum.errors import BatchError, ConfigError
from autoaccum.plan import make_plan
from autoaccum.train.data import window_source
from autoaccum.train.data.loader import LoaderWindows


def test_loader_windows_hold_target_samples_in_sampler_order() -> None:
    loader = DataLoader(ids_dataset(600), batch_size=32)
    stream = window_source(loader)
    plan = make_plan(256, 100)
    windows = list(stream.windows(plan, 0))

    assert isinstance(stream, LoaderWindows)
    assert [w.index for w in windows] == [0, 1, 2]
    assert [w.samples for w in windows] == [256, 256, 88]
    assert micro_sizes(windows[0]) == (86, 85, 85)
    assert micro_sizes(windows[1]) == (86, 85, 85)
    assert micro_sizes(windows[2]) == plan.window_sizes(88) == (44, 44)
    assert [i for w in windows for i in ids_of(w)] == list(range(600))
    assert stream.samples_per_epoch() == 600
    assert stream.num_windows(plan) == 3


def test_loader_batch_size_is_ignored_and_drop_last_drops_the_short_window() -> None:
    kept = list(
        window_source(DataLoader(ids_dataset(50), batch_size=7)).windows(make_plan(20, 8), 0)
    )
    assert [w.samples for w in kept] == [20, 20, 10]
    assert [i for w in kept for i in ids_of(w)] == list(range(50))
    source = window_source(DataLoader(ids_dataset(50), batch_size=7, drop_last=True))
    dropped = list(source.windows(make_plan(20, 8), 0))
    assert [(w.samples, w.dropped) for w in dropped] == [(20, 0), (20, 0), (0, 10)]
    assert dropped[-1].micro_batches == ()
    assert "drop_last=True" in dropped[-1].dropped_because
    assert source.num_windows(make_plan(20, 8)) == 2


def test_loader_without_auto_collation_is_batched_by_default_collate() -> None:
    loader = DataLoader(torch.arange(10).float(), batch_size=None)
    (window,) = window_source(loader).windows(make_plan(10, 4), 0)
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
    stream = window_source(loader)
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
    stream = window_source(loader)
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
    stream = window_source(loader)
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
    stream = window_source(loader)
    probe = stream.sample_batch(5)
    assert calls == [5]
    first = list(stream.windows(make_plan(8, 8), 0))
    assert first[0].micro_batches[0]["ids"].tolist()[:5] == probe["ids"].tolist()
    assert probe["tokens"].shape == (5, max(lengths[i] for i in probe["ids"].tolist()))


def test_sample_batch_larger_than_the_data_returns_all_of_it() -> None:
    stream = window_source(DataLoader(ids_dataset(6), batch_size=4))
    assert stream.sample_batch(100)[0].tolist() == list(range(6))
    listed = window_source([torch.arange(4), torch.arange(4, 7)])
    assert listed.sample_batch(100).tolist() == list(range(7))
    assert listed.sample_batch(5).tolist() == list(range(5))


def test_distributed_window_k_is_global_samples_k_target_to_k_plus_1_target() -> None:
    """Global window k is samples k·T … (k+1)·T − 1 of the one-process order, whatever the
    world size; each rank reads its share (as equal as the counts allow), none repeated."""
    target, n = 20, 110
    loader = DataLoader(ids_dataset(n), batch_size=16)
    for world in (2, 3):
        plans = [make_plan(target, 4, world_size=world, rank=r) for r in range(world)]
        per_rank = [
            list(window_source(loader, rank=r, world_size=world).windows(plans[r], 0))
            for r in range(world)
        ]
        assert [len(ws) for ws in per_rank] == [6] * world
        for k in range(6):
            ids = [ids_of(per_rank[r][k]) for r in range(world)]
            assert [i for rank_ids in ids for i in rank_ids] == list(
                range(k * target, min((k + 1) * target, n))
            )  # rank 0's block, then rank 1's, …: no sample twice, none missing
        assert [micro_sizes(per_rank[r][0]) for r in range(world)] == [p.micro_sizes for p in plans]
    assert [len(ids_of(w)) for w in per_rank[0]][-1] == 4  # the short window: 10 = 4+3+3


def test_distributed_shuffle_is_the_one_process_order_whatever_the_world_size() -> None:
    """Every rank draws the epoch's order as the user's loader would in one process (same
    seed, same order); the ranks' shares of it cover it once; it changes per epoch."""
    loader = DataLoader(ids_dataset(40), batch_size=8, shuffle=True)

    def epochs(world: int, seed: int) -> list[list[int]]:
        orders = []
        for rank in range(world):  # each rank is its own process, seeded alike
            torch.manual_seed(seed)
            source = window_source(loader, rank=rank, world_size=world)
            plan = make_plan(10, 5, world_size=world, rank=rank)
            orders.append([[i for w in source.windows(plan, e) for i in ids_of(w)] for e in (0, 1)])
        merged = []
        for e in (0, 1):  # window by window, rank 0's share first
            merged.append(
                [
                    i
                    for k in range(4)
                    for rank in range(world)
                    for i in orders[rank][e][_share_slice(k, rank, world, orders[rank][e])]
                ]
            )
        return merged

    one = epochs(1, seed=3)
    assert sorted(one[0]) == sorted(one[1]) == list(range(40))
    assert one[0] != one[1]
    assert one[0] != list(range(40))  # shuffled
    assert epochs(2, seed=3) == epochs(3, seed=3) == one
    assert epochs(2, seed=4) != one  # the user's seed decides, as in one process


def _share_slice(k: int, rank: int, world: int, ids: list[int]) -> slice:
    """Where window k's share lies in one rank's ids of a 40-sample epoch of 10-sample windows."""
    from autoaccum.plan import shares

    size = shares(10, world)[rank]
    return slice(k * size, (k + 1) * size)


def test_a_users_distributed_sampler_is_used_and_set_epoch_called() -> None:
    dataset = ids_dataset(24)
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=5)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler)
    stream = window_source(loader, rank=1, world_size=2)
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
        window_source(DataLoader(dataset, sampler=sampler), rank=1, world_size=2)


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
    windows = list(window_source(loader).windows(make_plan(4, 4), 0))
    assert [ids_of(w) for w in windows] == [[8, 7, 6, 5], [4, 3, 2, 1], [0]]


def test_a_custom_sampler_is_followed_on_several_ranks_too() -> None:
    """Its order is the global order; each rank reads its share of every window."""
    loader = DataLoader(ids_dataset(9), sampler=Reversed(9))
    shares = [
        [ids_of(w) for w in window_source(loader, rank=r, world_size=2).windows(plan, 0)]
        for r, plan in enumerate(make_plan(4, 4, 2, rank=r) for r in (0, 1))
    ]
    assert shares == [[[8, 7], [4, 3], [0]], [[6, 5], [2, 1], []]]


def test_a_custom_batch_sampler_is_flattened_into_the_global_order() -> None:
    stream = window_source(DataLoader(ids_dataset(6), batch_sampler=Buckets()))
    windows = list(stream.windows(make_plan(4, 2), 0))
    assert [ids_of(w) for w in windows] == [[5, 4, 0, 1], [2, 3]]
    assert micro_sizes(windows[0]) == (2, 2)
    assert stream.samples_per_epoch() is None
    other = window_source(DataLoader(ids_dataset(6), batch_sampler=Buckets()), rank=1, world_size=2)
    assert [ids_of(w) for w in other.windows(make_plan(4, 2, 2, rank=1), 0)] == [[0, 1], [3]]


def test_a_plain_batch_sampler_contributes_its_samplers_order() -> None:
    batch_sampler = BatchSampler(Reversed(5), batch_size=2, drop_last=True)
    stream = window_source(DataLoader(ids_dataset(5), batch_sampler=batch_sampler))
    assert [i for w in stream.windows(make_plan(3, 3), 0) for i in ids_of(w)] == [4, 3, 2, 1, 0]


@pytest.mark.parametrize(("rank", "world_size"), [(0, 0), (2, 2), (-1, 2), (0, 1.5), (True, 2)])
def test_invalid_rank_or_world_size_is_a_config_error(rank: Any, world_size: Any) -> None:
    with pytest.raises(ConfigError):
        window_source([torch.ones(2)], rank=rank, world_size=world_size)


def test_an_empty_loader_is_a_batch_error() -> None:
    stream = window_source(DataLoader(ids_dataset(0)))
    with pytest.raises(BatchError, match="yielded no samples"):
        list(stream.windows(make_plan(4, 2), 0))
    with pytest.raises(BatchError, match="yielded no samples"):
        stream.sample_batch(4)


class RandomView(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Sample i: its id and a random augmentation drawn when it is read."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(i), torch.rand(())


class Still(torch.nn.Module):
    """A model without randomness of its own, so only the data moves the random state."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x.double()


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("probed", [True, False])
def test_fit_trains_every_epoch_in_the_order_the_users_loader_would_draw(
    num_workers: int, probed: bool
) -> None:
    """Epoch after epoch, with and without the probe, with and without workers: the sample
    order is the permutation the user's own shuffling loader draws (epoch 1 is not a replay
    of epoch 0), and random augmentations differ from epoch to epoch."""
    loader = DataLoader(RandomView(), batch_size=4, shuffle=True, num_workers=num_workers)
    torch.manual_seed(0)
    expected = [[int(i) for ids, _ in loader for i in ids] for _ in range(3)]

    seen: list[list[int]] = [[], [], []]
    views: list[dict[int, float]] = [{}, {}, {}]
    epoch = [0]

    def count(batch: Any) -> int:  # called once per micro-batch of a window, in order
        ids, view = batch
        seen[epoch[0]].extend(int(i) for i in ids)
        views[epoch[0]].update(zip((int(i) for i in ids), view.tolist(), strict=True))
        if len(seen[epoch[0]]) == 16:
            epoch[0] += 1
        return len(ids)

    torch.manual_seed(0)
    autoaccum.fit(
        Still(),
        loader,
        8,
        loss_fn=lambda m, b: m(b[0]).mean(),
        count_fn=count,
        epochs=3,
        max_micro=None if probed else 4,
        device="cpu",
        progress=False,
        report=False,
    )
    assert seen == expected
    assert seen[0] != seen[1] != seen[2]
    assert views[0][0] != views[1][0] != views[2][0]  # sample 0 was augmented anew each epoch
