"""The memory-guided search, driven by a scripted device: jumps, gallops, the exact
maximum still, within the trial bound; and the probe's memory-based margin."""

from __future__ import annotations

import math

from helpers import OOM
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from autoaccum import search_max_batch
from autoaccum.memory.meter import Reading
from autoaccum.memory.peaks import TopReading, apply_margin, size_for_budget
from autoaccum.probing.search import AIM, max_trials

GB = 10**9

#: (allocated, reserved) peaks of autoaccum.probe's passing trials under a 24 GiB cap, read
#: on an H100 80GB with torch 2.11 (2026-11-25, benchmarks/workloads.py). GPT-2 small ran
#: out of memory from 23 on, ResNet-50 from 562 on.
H100_GPT2_24GIB = {
    1: (2_573_023_744, 2_736_783_360),
    2: (4_047_023_616, 4_649_385_984),
    4: (5_770_562_048, 6_591_348_736),
    8: (9_217_232_896, 11_272_192_000),
    16: (16_082_480_128, 20_654_850_048),
    20: (19_526_706_688, 25_325_207_552),
    22: (21_286_329_344, 25_469_911_040),
}
H100_RESNET50_24GIB = {
    2: (491_255_808, 534_773_760),
    4: (626_166_272, 652_214_272),
    8: (810_576_384, 826_277_888),
    16: (1_164_553_216, 1_245_708_288),
    32: (1_887_216_640, 2_195_718_144),
    64: (3_321_439_232, 4_089_446_400),
    128: (6_192_047_616, 7_686_062_080),
    256: (11_910_523_392, 14_791_213_056),
    512: (23_357_043_200, 25_195_184_128),
    544: (24_800_637_952, 25_732_055_040),
    560: (25_514_292_224, 25_765_609_472),
    561: (25_572_245_504, 25_727_860_736),
}
H100_LIMIT = 24 * 2**30


def replay(readings: dict[int, tuple[int, int]], oom_from: int) -> ScriptedDevice:
    return ScriptedDevice(
        {s: r for s, (_, r) in readings.items()},
        allocated={s: a for s, (a, _) in readings.items()},
        limit=H100_LIMIT,
        oom_from=oom_from,
    )


class ScriptedDevice:
    """Trial and meter in one: a trial at ``size`` reserves ``need(size)`` bytes and runs
    out of memory above the device limit; the meter reports what the last trial used."""

    def __init__(
        self,
        need: dict[int, int] | None = None,
        *,
        limit: int,
        fixed: int = 0,
        per_sample: int = 0,
        oom_from: int | None = None,
        allocated: dict[int, int] | None = None,
    ) -> None:
        self.table = need or {}
        #: live bytes where they differ from the reserve (a real allocator caches)
        self.live = ScriptedDevice(allocated, limit=limit) if allocated else None
        self.limit = limit
        self.fixed, self.per_sample = fixed, per_sample
        self.oom_from = oom_from
        self.tried: list[int] = []
        self._last = 0

    def need(self, size: int) -> int:
        if size in self.table:
            return self.table[size]
        if self.table:  # between measured sizes: linear interpolation; beyond: the last slope
            sizes = sorted(self.table)
            below = max((s for s in sizes if s < size), default=sizes[0])
            above = min((s for s in sizes if s > size), default=None)
            if above is None:
                below, above = sizes[-2], sizes[-1]
            a, b = self.table[below], self.table[above]
            return round(a + (b - a) * (size - below) / (above - below))
        return self.fixed + self.per_sample * size

    def passes(self, size: int) -> bool:
        if self.oom_from is not None:
            return size < self.oom_from
        return self.need(size) <= self.limit

    def __call__(self, size: int) -> None:
        self.tried.append(size)
        self._last = size
        if not self.passes(size):
            raise OOM(f"CUDA out of memory. Tried to allocate {size} GiB")

    # the Meter protocol
    def start(self) -> None:
        self._last = 0

    def stop(self) -> Reading:
        reserved = min(self.need(self._last), self.limit)
        live = min(self.live.need(self._last), self.limit) if self.live else reserved
        return Reading(peak_allocated=live, peak_reserved=reserved, alloc_retries=0)

    def allocated(self) -> int:
        return self.fixed


def test_replayed_h100_readings_take_fewer_trials_for_the_same_answer() -> None:
    gpt2 = replay(H100_GPT2_24GIB, oom_from=23)
    result = search_max_batch(gpt2, 1024, meter=gpt2)
    assert result.largest_pass == 22
    assert gpt2.tried == [1, 2, 16, 26, 21, 23, 22]
    assert result.limit_bytes == H100_LIMIT
    assert [t.peak_reserved for t in result.trials][:2] == [2_736_783_360, 4_649_385_984]
    plain = replay(H100_GPT2_24GIB, oom_from=23)
    assert search_max_batch(plain, 1024).largest_pass == 22  # no meter: doubling, bisection
    assert plain.tried == [1, 2, 4, 8, 16, 32, 24, 20, 22, 23]

    resnet = replay(H100_RESNET50_24GIB, oom_from=562)
    assert search_max_batch(resnet, 4096, lower=2, meter=resnet).largest_pass == 561
    assert resnet.tried == [2, 4, 361, 542, 565, 553, 559, 562, 560, 561]
    plain = replay(H100_RESNET50_24GIB, oom_from=562)
    assert search_max_batch(plain, 4096, lower=2).largest_pass == 561
    assert len(plain.tried) == 19


def test_a_jump_aims_under_the_limit_then_gallops() -> None:
    device = ScriptedDevice(limit=100 * GB, fixed=4 * GB, per_sample=GB // 10)
    result = search_max_batch(device, 4096, meter=device)
    exact = (100 * GB - 4 * GB) // (GB // 10)  # 960
    assert result.largest_pass == exact
    aimed = (AIM * 100 * GB - 4 * GB) // (GB // 10)
    assert device.tried == [1, 2, math.floor(aimed), exact, exact + 1]


def test_an_overshooting_jump_falls_back_to_bisection() -> None:
    """Memory that the line through small sizes underestimates (it grows faster above 50)."""

    def need(size: int) -> int:
        return GB + size * 10**8 + max(0, size - 50) ** 2 * 10**7

    device = ScriptedDevice({s: need(s) for s in range(1, 2049)}, limit=40 * GB)
    result = search_max_batch(device, 2048, meter=device)
    assert result.largest_pass == max(s for s in range(1, 2049) if need(s) <= 40 * GB)
    assert len(device.tried) <= max_trials(2048, guided=True)


def test_no_guidance_in_a_distributed_search() -> None:
    device = replay(H100_GPT2_24GIB, oom_from=23)
    search_max_batch(device, 1024, meter=device, agree=lambda failed: failed)
    assert device.tried == [1, 2, 4, 8, 16, 32, 24, 20, 22, 23]


@settings(max_examples=60, deadline=None)
@given(
    fixed=st.integers(0, 20 * GB),
    per_sample=st.integers(10**5, 4 * GB),
    limit=st.integers(1 * GB, 140 * GB),
    bend=st.integers(0, 10**9),
    lower=st.integers(1, 8),
    extra=st.integers(0, 5000),
)
def test_guided_search_is_exact_and_bounded(
    fixed: int, per_sample: int, limit: int, bend: int, lower: int, extra: int
) -> None:
    """Any monotone memory curve (a line bent upwards by ``bend``·size²) and limit."""
    upper = lower + extra
    sizes = range(1, upper + 1)
    table = {s: fixed + per_sample * s + bend * s * s for s in sizes}
    assume(table[lower] <= limit)  # otherwise nothing fits: another test's case
    device = ScriptedDevice(table, limit=limit)
    fitting = [s for s in sizes if s >= lower and table[s] <= limit]
    result = search_max_batch(device, upper, lower=lower, meter=device)
    assert result.largest_pass == max(fitting)
    assert len(device.tried) <= max_trials(upper, guided=True)
    assert len(set(device.tried)) == len(device.tried)
    assert max(device.tried) <= upper


def test_size_for_budget_uses_the_two_largest_passing_trials() -> None:
    device = ScriptedDevice(limit=10 * GB, fixed=GB, per_sample=GB)
    result = search_max_batch(device, 4, meter=device)  # 1, 2, 4 all pass
    assert size_for_budget(result.trials, 9.5 * GB) == 8
    assert size_for_budget(result.trials[:1], 9.5 * GB) is None


def test_margin_keeps_a_size_that_already_leaves_enough_spare() -> None:
    limit = 100 * GB
    spare = TopReading(limit=limit, peak=95 * GB, per_sample=GB)  # 5% spare
    assert apply_margin(50, margin=0.02, hit_limit=True, top=spare) == 50
    tight = TopReading(limit=limit, peak=int(99.5 * GB), per_sample=GB // 2)  # 0.5% spare
    # 2% of 100 GB = 2 GB wanted, 0.5 GB spare: 1.5 GB more, at 0.5 GB a sample
    assert apply_margin(50, margin=0.02, hit_limit=True, top=tight) == 47
    assert apply_margin(50, margin=0.02, hit_limit=False, top=tight) == 50
    assert apply_margin(2, margin=0.02, hit_limit=True, lower=2, top=tight) == 2


def test_probe_top_reading_is_read_from_the_trials() -> None:
    device = replay(H100_GPT2_24GIB, oom_from=23)
    found = search_max_batch(device, 1024, meter=device)
    top = TopReading.of(found.trials, found.largest_pass, found.limit_bytes)
    assert top is not None
    assert top.peak == H100_GPT2_24GIB[22][1]
    assert top.limit == H100_LIMIT
    # 1.1% spare at 22, 2% wanted: one sample of ~1.1 GB reserved is dropped
    assert apply_margin(22, margin=0.02, hit_limit=True, top=top) == 21
    unmeasured = search_max_batch(ScriptedDevice(limit=GB, oom_from=99), 64)
    assert TopReading.of(unmeasured.trials, unmeasured.largest_pass, None) is None
