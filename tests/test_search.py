"""search_max_batch: the exact largest size, the exact sizes tried, the bound, the errors."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import OOM
from hypothesis import given, settings
from hypothesis import strategies as st

from autoaccum import ConfigError, NoBatchFitsError, search_max_batch
from autoaccum.probing.search import max_trials


class Threshold:
    """A trial that runs out of memory above ``limit``, recording every size tried."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.tried: list[int] = []

    def __call__(self, size: int) -> None:
        self.tried.append(size)
        if size > self.limit:
            raise OOM(f"CUDA out of memory. Tried to allocate {size} GiB")


@pytest.mark.parametrize(
    ("limit", "upper", "lower", "sequence"),
    [
        (37, 256, 1, [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]),
        (256, 256, 1, [1, 2, 4, 8, 16, 32, 64, 128, 256]),
        (1000, 100, 1, [1, 2, 4, 8, 16, 32, 64, 100]),
        (99, 100, 1, [1, 2, 4, 8, 16, 32, 64, 100, 82, 91, 95, 97, 98, 99]),
        (1, 256, 1, [1, 2]),
        (15, 256, 2, [2, 4, 8, 16, 12, 14, 15]),
        (5, 5, 5, [5]),
    ],
)
def test_exact_sequence_of_sizes(limit: int, upper: int, lower: int, sequence: list[int]) -> None:
    trial = Threshold(limit)
    result = search_max_batch(trial, upper, lower=lower)
    assert trial.tried == sequence
    assert result.largest_pass == min(limit, upper)
    assert result.max_micro == result.largest_pass
    assert [t.size for t in result.trials] == sequence
    assert [t.passed for t in result.trials] == [s <= limit for s in sequence]


@settings(max_examples=40, deadline=None)
@given(limit=st.integers(1, 3000), upper=st.integers(1, 3000), lower=st.integers(1, 64))
def test_finds_exact_largest_within_bound(limit: int, upper: int, lower: int) -> None:
    if upper < lower:
        with pytest.raises(ConfigError):
            search_max_batch(Threshold(limit), upper, lower=lower)
        return
    trial = Threshold(limit)
    if limit < lower:
        with pytest.raises(NoBatchFitsError):
            search_max_batch(trial, upper, lower=lower)
        assert trial.tried == [lower]
        return
    result = search_max_batch(trial, upper, lower=lower)
    assert result.largest_pass == min(limit, upper)
    assert max(trial.tried) <= upper
    assert len(trial.tried) <= max_trials(upper)
    assert len(set(trial.tried)) == len(trial.tried)  # never the same size twice


def test_nothing_fits_says_what_was_tried_and_what_to_do() -> None:
    with pytest.raises(NoBatchFitsError) as info:
        search_max_batch(Threshold(0), 64)
    message = str(info.value)
    assert "smallest micro-batch (1)" in message
    assert "1 (oom)" in message
    assert "precision='bf16'" in message
    assert "cpu" in message


def test_non_oom_errors_propagate_unchanged() -> None:
    def trial(size: int) -> None:
        if size > 4:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        search_max_batch(trial, 64)


def test_cudnn_size_limit_only_after_a_pass() -> None:
    message = (
        "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
        "non-contiguous input."
    )

    def limited(size: int) -> None:
        if size > 6:
            raise RuntimeError(message)

    assert search_max_batch(limited, 64).largest_pass == 6

    def always(size: int) -> None:
        raise RuntimeError(message)

    with pytest.raises(RuntimeError, match="NOT_SUPPORTED"):  # a real bug at the smallest size
        search_max_batch(always, 64)


def test_no_exception_or_failed_frame_is_kept() -> None:
    refs: list[weakref.ref[torch.Tensor]] = []

    def trial(size: int) -> None:
        activations = torch.empty(size, 8)
        refs.append(weakref.ref(activations))
        if size > 8:
            raise OOM("CUDA out of memory")

    search_max_batch(trial, 64)
    gc.collect()
    assert refs
    assert all(ref() is None for ref in refs)


def test_cleanup_runs_after_every_trial() -> None:
    calls: list[int] = []
    trial = Threshold(10)
    search_max_batch(trial, 64, cleanup=lambda: calls.append(len(trial.tried)))
    assert calls == list(range(1, len(trial.tried) + 1))


def test_agree_makes_every_rank_take_the_same_branch() -> None:
    """Another rank ran out of memory at 16: this rank, which fits 40, must follow it."""
    trial = Threshold(40)
    result = search_max_batch(trial, 64, agree=lambda failed: failed or trial.tried[-1] >= 16)
    assert trial.tried == [1, 2, 4, 8, 16, 12, 14, 15]
    assert result.largest_pass == 15
    assert result.trials[4].failure == "oom (another rank)"


@pytest.mark.parametrize(("upper", "lower"), [(0, 1), (4, 8), (4, 0)])
def test_bad_bounds(upper: int, lower: int) -> None:
    with pytest.raises(ConfigError):
        search_max_batch(Threshold(10), upper, lower=lower)


def test_records_are_plain_data() -> None:
    result = search_max_batch(Threshold(10), 64)
    data = result.to_dict()
    assert data["largest_pass"] == 10
    assert data["limited_by"] == "memory"
    assert len(data["trials"]) == len(result.trials)  # type: ignore[arg-type]
    assert search_max_batch(Threshold(100), 64).limited_by == "upper=64"
