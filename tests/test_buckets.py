"""The deferred reduction in flat buckets (autoaccum/buckets.py): how tensors are packed, and on
2 real gloo ranks that it averages exactly as one all-reduce per parameter did, with a
fraction of the collectives; the buffers' broadcast likewise.

The 2-rank test launches ``tests/dist_workers/buckets_worker.py`` twice, bounded by
``TIMEOUT`` (collectives by 30 s), and checks what the ranks saved.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_workers.buckets_worker import BIG, CONFIGS
from dist_workers.common import WORLD
from torch import nn

from autoaccum import distributed as D
from autoaccum.buckets import BUCKET_BYTES, _run, plan_buckets
from autoaccum.errors import ConfigError

pytestmark = pytest.mark.xdist_group("buckets")  # one launch, on one xdist worker

WORKER = Path(__file__).parent / "dist_workers" / "buckets_worker.py"
TIMEOUT = 120.0  # seconds for the whole 2-process launch
TOL = 1e-12


def t(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(numel, dtype=dtype)


def test_buckets_hold_one_dtype_in_order_up_to_the_cap() -> None:
    f8, bf = torch.float64, torch.bfloat16
    tensors = [t(10), t(3, f8), t(20), t(2, bf), t(6), t(1, f8), t(4)]
    # 40 bytes a bucket: float32 40 (full), 80 (over: alone), then 24 + 16; float64 24 + 8
    assert plan_buckets(tensors, 40) == [[0], [1, 5], [2], [3], [4, 6]]
    assert plan_buckets(tensors) == [[0, 2, 4, 6], [1, 5], [3]]  # everything fits in 25 MiB


def test_a_tensor_over_the_cap_is_alone_and_its_dtype_bucket_stays_open() -> None:
    tensors = [t(2), t(100), t(3), t(4)]
    assert plan_buckets(tensors, 32) == [[0, 2], [1], [3]]


def test_zero_bytes_is_one_bucket_per_tensor_and_sparse_tensors_are_never_packed() -> None:
    sparse = torch.zeros(4, 4).to_sparse()
    assert plan_buckets([t(1), t(1), t(1)], 0) == [[0], [1], [2]]
    assert plan_buckets([t(1), sparse, t(1)], BUCKET_BYTES) == [[0, 2], [1]]
    assert plan_buckets([]) == []


class _Work:
    def __init__(self, log: list[tuple[str, int]], n: int) -> None:
        self.log, self.n = log, n

    def wait(self) -> None:
        self.log.append(("wait", self.n))


def test_at_most_in_flight_packed_buckets_exist_at_once() -> None:
    """The schedule alone (no process group): a bucket is packed only when fewer than
    ``in_flight`` packed ones are outstanding; tensors that go as they are never wait."""
    log: list[tuple[str, int]] = []
    tensors = [t(2), t(2), t(100), t(2), t(2), t(2), t(2), t(2), t(2)]  # 8 bytes a bucket

    buffers: set[int] = set()

    def issue(flat: torch.Tensor) -> _Work:
        log.append(("issue", flat.numel()))
        if flat.numel() == 4:  # packed: through one of the reused buffers
            buffers.add(flat.untyped_storage().data_ptr())
        return _Work(log, len(log))

    def finish(flat: torch.Tensor, members: list[torch.Tensor]) -> None:
        log.append(("finish", len(members)))

    as_is = _run(tensors, 16, issue, finish, in_flight=2)
    assert [x.numel() for x in as_is] == [100]  # alone over the cap: reduced where it is
    outstanding = most = 0
    for kind, n in log:
        if kind == "issue" and n == 4:
            outstanding += 1
            most = max(most, outstanding)
        elif kind == "finish":
            outstanding -= 1
    assert most == 2
    assert len(buffers) == 2  # 4 packed buckets through 2 buffers, allocated once
    assert [k for k, _ in log].count("finish") == 4  # every packed bucket copied back
    assert log[:4] == [("issue", 4), ("issue", 100), ("issue", 4), ("wait", 1)]


@pytest.mark.parametrize("bad", [-1, 2.5, True, "25MiB", None])
def test_a_bad_bucket_size_is_a_config_error_before_any_work(bad: Any) -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="bucket_bytes"):
        plan_buckets([t(1)], bad)
    # even without a process group (where the reduction is a no-op), nothing touched
    with pytest.raises(ConfigError, match="bucket_bytes"):
        D.reduce_gradients(model, D.DistInfo(), bucket_bytes=bad)
    with pytest.raises(ConfigError, match="bucket_bytes"):
        D.broadcast_buffers(model, D.DistInfo(), bucket_bytes=bad)
    assert all(p.grad is None for p in model.parameters())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each of the 2 gloo ranks saved (one launch for the module)."""
    out = tmp_path_factory.mktemp("buckets")
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logs = [out / f"rank{r}.log" for r in range(WORLD)]
    procs = []
    for r in range(WORLD):
        with logs[r].open("w") as log:
            cmd = [sys.executable, str(WORKER), str(r), str(port), str(out)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = "\n".join(f"--- rank {r} ---\n{logs[r].read_text()}" for r in range(WORLD))
    if codes is None:
        pytest.fail(f"the 2-rank launch ran past {TIMEOUT:.0f} s (a hang)\n{text}")
    if any(codes):
        pytest.fail(f"worker exit codes {codes}\n{text}")
    saved = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r in range(WORLD):
        (out / f"rank{r}.pt").unlink()  # 130 MB each (the parameter over a bucket)
    return saved


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.double().abs().max()) or 1.0
    return float((a.double() - b.double()).abs().max()) / scale


def _mean_of_ranks(ranks: list[dict[str, Any]], i: int, like: torch.Tensor) -> torch.Tensor:
    """The float64 average of the ranks' own gradients, None counted as zeros."""
    local = [r["local"][i] for r in ranks]
    return sum((torch.zeros_like(like) if g is None else g).double() for g in local) / WORLD


@pytest.mark.distributed
@pytest.mark.parametrize("config", list(CONFIGS))
def test_buckets_average_exactly_as_one_all_reduce_per_parameter(
    ranks: list[dict[str, Any]], config: str
) -> None:
    names = ranks[0]["names"]
    assert ranks[0]["local"][names.index("big")].numel() == BIG  # one tensor over a bucket
    for i, name in enumerate(names):
        got = [r[f"reduced/{config}"][i] for r in ranks]
        if name == "frozen":
            assert got == [None, None]
            continue
        ref = ranks[0]["per_parameter"][i]
        assert torch.equal(got[0], got[1]), name  # every rank holds the same average
        assert got[0].dtype == ref.dtype, name
        assert _rel(got[0], ref) <= TOL, name
        if ref.dtype == torch.float64:  # independent of gloo: the mean of what the ranks had
            assert _rel(got[0], _mean_of_ranks(ranks, i, ref)) <= TOL, name
        # negative control: what a rank had differs from the average far beyond TOL
        if name != "unused":
            mine = ranks[1]["local"][i]
            mine = torch.zeros_like(ref) if mine is None else mine
            assert _rel(mine, got[0]) > 1e-3, name
    for r in ranks:
        assert all(r[f"kept/{config}"]), "a gradient tensor was replaced, not written into"


@pytest.mark.distributed
def test_one_all_reduce_per_bucket_not_per_parameter(ranks: list[dict[str, Any]]) -> None:
    trainable = len(ranks[0]["names"]) - 1  # all but the frozen one
    for r in ranks:
        assert r["all_reduces/none"] == trainable == 13
        # float64 (the small ones, 7 tensors) + the big one alone + float32 + bfloat16
        assert r["all_reduces/default"] == 4
        assert 4 < r["all_reduces/small"] < trainable  # several buckets, several in each


@pytest.mark.distributed
@pytest.mark.parametrize("config", list(CONFIGS))
def test_buffers_are_rank_0s_after_the_broadcast(ranks: list[dict[str, Any]], config: str) -> None:
    source, other = ranks[0]["buffers_before"], ranks[1]["buffers_before"]
    assert not all(torch.equal(a, b) for a, b in zip(source, other, strict=True))
    for r in ranks:
        after = r[f"buffers/{config}"]
        assert all(torch.equal(a, b) for a, b in zip(after, source, strict=True))
        assert [b.dtype for b in after] == [b.dtype for b in source]
    expected = {"default": 3, "small": 3, "none": 4}[config]  # float32, int64, float64
    assert ranks[0][f"broadcasts/{config}"] == expected
