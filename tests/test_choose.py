"""The fastest-plan decision (autoaccum.probing.choose): pure functions, scripted timings.

Which sizes are worth timing (only the largest micro-batch of some plan), the predicted
samples/s of each plan, the exact choice for scripted timings, the noise rule (the smaller
micro-batch within the tolerance), ties, a single candidate, the reason in words, and the
timing helper with a fake clock.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoaccum import make_plan
from autoaccum.errors import ConfigError, PlanError
from autoaccum.probing.choose import (
    DEFAULT_TOLERANCE,
    candidate_sizes,
    choose_fastest,
    describe_sizes,
    plan_sizes,
    predict,
    time_call,
    time_sizes,
)


def brute_plan_sizes(per_rank: int, ceiling: int, min_micro: int) -> tuple[int, ...]:
    sizes = set()
    for m in range(min_micro, ceiling + 1):
        try:
            sizes.add(make_plan(per_rank, m, min_micro=min_micro).micro_batch)
        except PlanError:
            continue
    return tuple(sorted(sizes, reverse=True))


# --------------------------------------------------------------------------- candidates


def test_plan_sizes_are_the_largest_micro_batch_of_some_plan() -> None:
    assert plan_sizes(256, 100)[:6] == (86, 64, 52, 43, 37, 32)
    assert plan_sizes(1024, 561, 2)[:4] == (512, 342, 256, 205)
    assert plan_sizes(64, 1000) == (64, 32, 22, 16, 13, 11, 10, 8, 7, 6, 5, 4, 3, 2, 1)
    assert plan_sizes(5, 2, min_micro=2) == ()  # 5 cannot be split into parts of 2 or more


@pytest.mark.parametrize(
    ("per_rank", "ceiling", "min_micro"),
    [(256, 100, 1), (1024, 561, 2), (97, 97, 1), (100, 7, 3), (5, 2, 2), (1, 1, 1), (300, 299, 2)],
)
def test_plan_sizes_match_make_plan_over_every_ceiling(
    per_rank: int, ceiling: int, min_micro: int
) -> None:
    assert plan_sizes(per_rank, ceiling, min_micro) == brute_plan_sizes(
        per_rank, ceiling, min_micro
    )


def test_candidates_are_the_top_plan_sizes_and_one_near_half() -> None:
    assert candidate_sizes(256, 100) == (86, 64, 52, 43)  # half of 86 is 43
    assert candidate_sizes(256, 75) == (64, 52, 43, 32)  # half of 64 is 32
    assert candidate_sizes(1024, 550, 2) == (512, 342, 256)  # half of 512 is already there
    assert candidate_sizes(256, 100, near=1) == (86, 43)
    assert candidate_sizes(256, 100, near=2, fractions=(0.5, 0.25)) == (86, 64, 43, 22)
    assert candidate_sizes(10, 10) == (10, 5, 4)
    assert candidate_sizes(1, 1) == (1,)
    with pytest.raises(ConfigError, match="fractions"):
        candidate_sizes(256, 100, fractions=(1.5,))


# --------------------------------------------------------------------------- prediction


def test_predict_sums_each_micro_step_and_one_optimizer_step() -> None:
    rates = predict(256, {86: 0.043, 64: 0.0289}, step_seconds=0.002)
    assert [r.micro_sizes for r in rates] == [(86, 85, 85), (64, 64, 64, 64)]
    uneven, even = rates
    # 85 was not timed: scaled per sample from 86, the nearest timed size
    assert uneven.window_seconds == pytest.approx(0.043 + 2 * 0.043 * 85 / 86 + 0.002)
    assert uneven.estimated
    assert even.window_seconds == pytest.approx(4 * 0.0289 + 0.002)
    assert not even.estimated
    assert even.samples_per_s == pytest.approx(256 / (4 * 0.0289 + 0.002))


def test_predict_gives_one_entry_per_distinct_plan() -> None:
    # 80 and 64 both plan 64 × 4 for 256 samples; 64's own timing is used
    rates = predict(256, {80: 0.05, 64: 0.03})
    assert [r.micro_sizes for r in rates] == [(64, 64, 64, 64)]
    assert rates[0].window_seconds == pytest.approx(4 * 0.03)


# --------------------------------------------------------------------------- the choice


def timings_for(rates: dict[tuple[int, ...], float], per_rank: int) -> dict[int, float]:
    """Micro-step seconds that make each plan (of equal or ±1 sizes) run at ``rates``."""
    out = {}
    for sizes, rate in rates.items():
        top = sizes[0]
        window = per_rank / rate
        out[top] = window / sum(s / top for s in sizes)  # scaling gives the others
    return out


def test_choose_the_faster_smaller_plan_with_the_reason_in_words() -> None:
    timings = timings_for({(86, 85, 85): 2112.0, (64, 64, 64, 64): 2214.0}, 256)
    choice = choose_fastest(256, 100, timings)
    assert choice.plan == make_plan(256, 64)
    assert choice.plan.micro_sizes == (64, 64, 64, 64)
    assert choice.samples_per_s == pytest.approx(2214.0)
    assert (
        choice.reason == "chose 64 × 4: 2 214 samples/s; 86+85+85 would give 2 112 (4.6 % slower)"
    )
    assert [r.describe() for r in choice.rates] == ["86+85+85", "64 × 4"]


def test_choose_the_largest_plan_when_it_is_clearly_fastest() -> None:
    timings = timings_for({(86, 85, 85): 2300.0, (64, 64, 64, 64): 2214.0}, 256)
    choice = choose_fastest(256, 100, timings)
    assert choice.plan.micro_batch == 86
    assert (
        choice.reason == "chose 86+85+85: 2 300 samples/s; 64 × 4 would give 2 214 (3.7 % slower)"
    )


def test_a_smaller_plan_within_the_tolerance_wins() -> None:
    # 64 × 4 is 0.5 % slower than 86+85+85: timing noise; the smaller one leaves memory spare
    timings = timings_for({(86, 85, 85): 2000.0, (64, 64, 64, 64): 1990.0}, 256)
    choice = choose_fastest(256, 100, timings)
    assert DEFAULT_TOLERANCE == 0.01
    assert choice.plan.micro_batch == 64
    assert choice.reason == (
        "chose 64 × 4: 1 990 samples/s, within 0.5 % of the fastest, 86+85+85 (2 000); "
        "the smaller micro-batch leaves memory spare"
    )
    # the smallest of all plans within the tolerance, not just the nearest one
    three = timings_for({(86, 85, 85): 2000.0, (64,) * 4: 1995.0, (52, 51, 51, 51, 51): 1991}, 256)
    assert choose_fastest(256, 100, three).plan.micro_batch == 52
    # outside it, the faster one
    assert choose_fastest(256, 100, timings, tolerance=0.004).plan.micro_batch == 86


def test_an_exact_tie_goes_to_the_smaller_plan_even_without_tolerance() -> None:
    timings = timings_for({(86, 85, 85): 2000.0, (64, 64, 64, 64): 2000.0}, 256)
    assert choose_fastest(256, 100, timings, tolerance=0.0).plan.micro_batch == 64


def test_a_single_candidate_is_chosen_and_says_so() -> None:
    choice = choose_fastest(256, 100, {86: 0.04})
    assert choice.plan.micro_sizes == (86, 85, 85)
    assert len(choice.rates) == 1
    assert choice.reason.endswith("the only candidate")
    assert choice.reason.startswith("chose 86+85+85: ")


def test_the_chosen_plan_is_one_ranks_share() -> None:
    choice = choose_fastest(128, 50, {43: 0.02, 32: 0.014})
    assert choice.plan.target_batch == 128
    assert choice.plan.micro_sizes == make_plan(128, choice.plan.micro_batch).micro_sizes
    # the plan is made under the chosen size; the probe's ceiling stays in ProbeResult.max_micro
    assert choice.plan.max_micro == choice.plan.micro_batch


def test_the_choice_is_frozen_data_and_json_ready() -> None:
    choice = choose_fastest(256, 100, {86: 0.04, 64: 0.03}, step_seconds=0.001)
    with pytest.raises(dataclasses.FrozenInstanceError):
        choice.reason = "x"  # type: ignore[misc]
    data = json.loads(json.dumps(choice.to_dict()))
    assert data["plan"]["micro_sizes"] == [64, 64, 64, 64]
    assert data["tolerance"] == DEFAULT_TOLERANCE
    assert [r["micro_sizes"] for r in data["rates"]] == [[86, 85, 85], [64, 64, 64, 64]]


@pytest.mark.parametrize(
    ("timings", "kwargs", "match"),
    [
        ({}, {}, "empty"),
        ({101: 0.04}, {}, "outside"),
        ({1: 0.04}, {"min_micro": 2}, "outside"),
        ({86: 0.0}, {}, "positive"),
        ({86: float("nan")}, {}, "positive"),
        ({86: 0.04}, {"step_seconds": -1.0}, "step_seconds"),
        ({86: 0.04}, {"tolerance": 1.0}, "tolerance"),
    ],
)
def test_bad_timings_are_config_errors(
    timings: dict[int, float], kwargs: dict[str, float], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        choose_fastest(256, 100, timings, **kwargs)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    per_rank=st.integers(1, 400),
    ceiling=st.integers(1, 400),
    data=st.data(),
)
def test_the_choice_is_within_tolerance_and_no_smaller_plan_is(
    per_rank: int, ceiling: int, data: st.DataObject
) -> None:
    sizes = candidate_sizes(per_rank, ceiling)
    timings = {s: data.draw(st.floats(0.001, 1.0)) for s in sizes}
    choice = choose_fastest(per_rank, ceiling, timings)
    best = max(r.samples_per_s for r in choice.rates)
    assert choice.samples_per_s >= best * (1 - DEFAULT_TOLERANCE)
    assert sum(choice.plan.micro_sizes) == per_rank
    assert choice.plan.micro_batch <= ceiling
    for r in choice.rates:
        if r.micro_batch < choice.plan.micro_batch:
            assert r.samples_per_s < best * (1 - DEFAULT_TOLERANCE)


def test_describe_sizes() -> None:
    assert describe_sizes((64, 64, 64, 64)) == "64 × 4"
    assert describe_sizes((86, 85, 85)) == "86+85+85"
    assert describe_sizes((7, 7, 7, 7, 6, 6, 6, 6, 6, 6)) == "7 × 4 + 6 × 6"
    assert describe_sizes((52, 51, 51, 51, 51)) == "52 + 51 × 4"


# --------------------------------------------------------------------------- timing


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.events: list[str] = []

    def __call__(self) -> float:
        self.events.append("clock")
        return self.now


def test_time_call_times_a_block_between_two_syncs_after_the_warm_up() -> None:
    clock = FakeClock()

    def run() -> None:
        clock.events.append("run")
        clock.now += 0.5

    def sync() -> None:
        clock.events.append("sync")

    assert time_call(run, warmup=2, repeats=3, sync=sync, clock=clock) == pytest.approx(0.5)
    assert clock.events == ["run", "run", "sync", "clock", "run", "run", "run", "sync", "clock"]


def test_time_sizes_times_each_size() -> None:
    clock = FakeClock()
    calls: list[int] = []

    def run_at(size: int) -> None:
        calls.append(size)
        clock.now += size * 0.001

    out = time_sizes(run_at, (86, 64), warmup=1, repeats=2, clock=clock)
    assert out == pytest.approx({86: 0.086, 64: 0.064})
    assert calls == [86, 86, 86, 64, 64, 64]
    with pytest.raises(ConfigError, match="repeats"):
        time_call(lambda: None, repeats=0)
