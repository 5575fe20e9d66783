"""make_plan: micro_sizes × world_size == target_batch, always."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoaccum import ConfigError, PlanError, make_plan
from autoaccum.plan import equal_plan, even_split


@pytest.mark.parametrize(
    ("target", "max_micro", "world", "sizes"),
    [
        (256, 100, 1, (86, 85, 85)),
        (256, 256, 1, (256,)),
        (256, 1000, 1, (256,)),
        (256, 64, 1, (64, 64, 64, 64)),
        (256, 63, 1, (52, 51, 51, 51, 51)),
        (256, 100, 2, (64, 64)),
        (256, 100, 4, (64,)),
        (255, 100, 3, (85,)),
        (255, 40, 3, (29, 28, 28)),
        (7, 1, 1, (1,) * 7),
        (10, 3, 2, (3, 2)),
        (10, 2, 2, (2, 2, 1)),
        (1, 1, 1, (1,)),
        (8, 1, 8, (1,)),
    ],
)
def test_exact_plans(target: int, max_micro: int, world: int, sizes: tuple[int, ...]) -> None:
    plan = make_plan(target, max_micro, world)
    assert plan.micro_sizes == sizes
    assert plan.accum_iter == len(sizes)
    assert plan.micro_batch == sizes[0]
    assert sum(plan.micro_sizes) * world == target


@given(
    target=st.integers(1, 5000),
    max_micro=st.integers(1, 600),
    world=st.sampled_from([1, 2, 3, 4, 8]),
)
def test_plan_is_always_exact(target: int, max_micro: int, world: int) -> None:
    """Every rank's share, split its way, adds up to the target (no sample repeated, none
    left out); shares differ by at most one sample; splits are as even as they go."""
    if target < world:  # a rank would hold no sample of a window
        with pytest.raises(PlanError, match="leaves a rank no sample"):
            make_plan(target, max_micro, world)
        return
    plans = [make_plan(target, max_micro, world, rank=r) for r in range(world)]
    assert sum(sum(p.micro_sizes) for p in plans) == target
    assert max(p.per_rank for p in plans) - min(p.per_rank for p in plans) <= 1
    for plan in plans:
        assert sum(plan.micro_sizes) == plan.per_rank
        assert max(plan.micro_sizes) <= max_micro
        assert max(plan.micro_sizes) - min(plan.micro_sizes) <= 1
        # no fewer micro-steps are possible at this max_micro
        assert (plan.accum_iter - 1) * max_micro < plan.per_rank


def test_a_target_that_does_not_divide_is_shared_unevenly() -> None:
    """256 on 3 ranks: 86, 85, 85 (no rank repeats a sample to even them out); loops that need
    equal shares (Lightning, the Trainer) still ask for a multiple, naming the nearest."""
    assert [make_plan(256, 100, 3, rank=r).micro_sizes for r in range(3)] == [(86,), (85,), (85,)]
    assert make_plan(256, 40, 3).describe() == (
        "target_batch 256 = rank 0: 29+29+28, rank 1: 29+28+28, rank 2: 29+28+28"
    )
    with pytest.raises(PlanError, match=r"target_batch=255 or 258 \(a multiple of 3\)"):
        equal_plan(256, 100, 3)
    with pytest.raises(PlanError, match="target_batch ≥ 8"):
        make_plan(5, 2, 8)


@pytest.mark.parametrize("bad", [0, -4, 2.5, "256", True, None])
def test_bad_target_batch(bad: object) -> None:
    with pytest.raises(ConfigError, match="target_batch"):
        make_plan(bad, 10)  # type: ignore[arg-type]


def test_short_last_window() -> None:
    plan = make_plan(256, 100)
    assert plan.window_sizes(256) == (86, 85, 85)
    assert plan.window_sizes(136) == (68, 68)
    assert plan.window_sizes(86) == (86,)
    assert plan.window_sizes(100) == (50, 50)
    assert plan.window_sizes(1) == (1,)
    assert even_split(10, 4) == (3, 3, 2, 2)


def test_describe() -> None:
    assert make_plan(256, 100).describe() == ("target_batch 256 = 86+85+85 (accum_iter 3) × 1 rank")
    assert "64 × 1" in make_plan(256, 100, 4).describe()
