"""The default process group ``fit`` makes from torchrun's variables: bounded at every wait,
made once and kept for the rest of the process.

torchrun serves a key-value store at ``MASTER_ADDR:MASTER_PORT`` for the whole job
(``TORCHELASTIC_USE_AGENT_STORE``); other launchers that set the same variables leave rank 0 to
serve it. torch's own ``env://`` set-up names the group's keys in that store after a counter that
``destroy_process_group`` resets, so a second group made on the same store reads the first
one's addresses: a connection refused on one rank, and the other waiting for the whole timeout.
Hence, here:

* every group gets keys of its own (``autoaccum/group{N}/``, N counted per rank in the store:
  the ranks make groups in the same order, so their N agree);
* the ranks first meet in the store, a wait of up to ``timeout`` (ranks may reach ``fit`` far
  apart, e.g. while rank 0 prepares the data) that ends at once when a rank reports that it gave
  up; only then do they connect, bounded by :func:`connect_bound` (seconds, not ``timeout``);
  a rank whose connection fails reports it in the store, so no rank waits on it longer than
  that bound, and every rank raises a :class:`~autoaccum.errors.DistributedError` that says
  which rank failed and why;
* the group is kept once made, so later ``fit`` calls of the process (pre-training then
  fine-tuning, a learning-rate sweep) reuse it and never meet again; it is destroyed when the
  process exits (``atexit``), unless it was destroyed before.
"""

from __future__ import annotations

import atexit
import datetime
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch.distributed as dist

if TYPE_CHECKING:
    from torch._C._distributed_c10d import Store

from autoaccum.errors import DistributedError

__all__ = ["CONNECT_SECONDS", "connect_bound", "join"]

#: how long connecting may take once every rank has arrived (plus 20 ms per rank)
CONNECT_SECONDS = 5.0
_POLL_SECONDS = 0.05
_T = TypeVar("_T")


def connect_bound(world_size: int, timeout: datetime.timedelta) -> datetime.timedelta:
    """The bound on connecting the ranks once all of them have met: what a rank whose own
    connection failed can make the others wait, at most (never more than ``timeout``)."""
    return min(timeout, datetime.timedelta(seconds=CONNECT_SECONDS + world_size / 50))


def join(backend: str, timeout: datetime.timedelta) -> None:
    """Initialise the default process group from torchrun's variables (see the module's doc).

    Raises :class:`DistributedError` on every rank when a rank does not arrive within
    ``timeout`` or fails to connect; no group is left behind then.
    """
    from torch.distributed import distributed_c10d

    rank, world_size, host, port = _environment()
    store = _open_store(host, port, rank, world_size, timeout)
    meeting = _Meeting(store, rank, world_size)
    meeting.wait("arrived", timeout, "reach the process group's set-up")
    settable = hasattr(distributed_c10d, "_set_pg_timeout")
    connect = connect_bound(world_size, timeout) if settable else timeout
    keys = dist.PrefixStore(meeting.prefix + "pg", store)  # type: ignore[attr-defined]
    try:
        dist.init_process_group(
            backend,
            store=keys,
            rank=rank,
            world_size=world_size,
            timeout=connect,
        )
    except Exception as exc:  # gloo's and NCCL's errors have no common type
        meeting.fail(f"could not connect ({backend}): {type(exc).__name__}: {exc}")
        _forget_failed_group(distributed_c10d)
        raise DistributedError(meeting.failure_message()) from None
    try:
        meeting.wait("ready", connect, "finish connecting")
    except DistributedError:
        dist.destroy_process_group()
        raise
    if settable:  # collectives wait up to timeout; only connecting was bounded shorter
        distributed_c10d._set_pg_timeout(timeout)
    atexit.register(_leave, dist.group.WORLD, store)


def _forget_failed_group(c10d: object) -> None:
    """torch names groups after a count that a failed ``init_process_group`` leaves raised and
    ``destroy_process_group`` resets: reset it as destroy would (no default group exists), or
    this rank's next group would be named unlike the other ranks' and never connect."""
    world = getattr(c10d, "_world", None)
    if world is not None and hasattr(world, "group_count"):
        world.group_count = 0


def _leave(group: object, store: Store) -> None:
    """At exit: destroy the group ``join`` made, unless it is gone or was replaced. ``store``
    is held until then so that a later group of this process can meet on the same store."""
    del store
    if dist.is_initialized() and dist.group.WORLD is group:
        dist.destroy_process_group()


def _environment() -> tuple[int, int, str, int]:
    values = {name: os.environ.get(name, "") for name in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    try:
        rank, world_size, port = (int(v) for v in values.values())
    except ValueError:
        raise DistributedError(
            f"torchrun's variables are not integers ({values}); launch with torchrun, or call "
            "torch.distributed.init_process_group() yourself before autoaccum.fit()"
        ) from None
    if not 0 <= rank < world_size or not 0 < port < 2**16:
        raise DistributedError(
            f"RANK={rank}, WORLD_SIZE={world_size}, MASTER_PORT={port}: RANK must be in "
            "[0, WORLD_SIZE) and MASTER_PORT a TCP port; launch with torchrun"
        )
    return rank, world_size, os.environ["MASTER_ADDR"], port


def _open_store(
    host: str, port: int, rank: int, world_size: int, timeout: datetime.timedelta
) -> Store:
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        return dist.TCPStore(  # type: ignore[attr-defined,no-any-return]
            host,
            port,
            world_size,
            is_master=rank == 0 and not agent,  # torchrun's agent serves it; else rank 0 does
            timeout=timeout,
            wait_for_workers=False,  # the meeting below waits, and can stop waiting
            multi_tenant=True,  # a later group of this process reuses rank 0's server
        )
    except Exception as exc:
        raise DistributedError(
            f"rank {rank} could not reach the rendezvous store at {host}:{port} "
            f"(MASTER_ADDR, MASTER_PORT) within {timeout.total_seconds():g}s: {exc}. Check that "
            "every rank was launched with the same rendezvous settings"
        ) from None


class _Meeting:
    """The ranks' meeting in the store for one group: who arrived, who failed and why."""

    def __init__(self, store: Store, rank: int, world_size: int) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        number = self._call(store.add, f"autoaccum/rank{rank}/groups", 1)
        self.prefix = f"autoaccum/group{number}/"

    def wait(self, phase: str, bound: datetime.timedelta, what: str) -> None:
        """Say this rank reached ``phase``; wait until every rank has, or one gave up (what
        the others did not do, if they never do, says ``what``)."""
        key = self.prefix + phase
        self._call(self.store.set, f"{key}/{self.rank}", "1")
        self._call(self.store.add, key, 1)
        deadline = time.monotonic() + bound.total_seconds()
        while True:
            # a failure first: a rank late to a meeting that was given up must not connect
            if self._call(self.store.check, [self.prefix + "failed"]):
                raise DistributedError(self.failure_message())
            if self._call(self.store.add, key, 0) >= self.world_size:
                return
            if time.monotonic() > deadline:
                missing = [
                    r
                    for r in range(self.world_size)
                    if not self._call(self.store.check, [f"{key}/{r}"])
                ]
                self.fail(f"ranks {missing} did not {what} within {bound.total_seconds():g}s")
                raise DistributedError(self.failure_message())
            time.sleep(_POLL_SECONDS)

    def fail(self, reason: str) -> None:
        """Record this rank's failure for the others (the first failure recorded stays)."""
        try:
            self.store.compare_set(self.prefix + "failed", "", f"rank {self.rank}: {reason}")
        except Exception:  # the store itself is gone: the others find out by themselves
            return

    def failure_message(self) -> str:
        """What every rank raises: the first failure any rank recorded."""
        key = self.prefix + "failed"
        try:  # get() would wait for a key that is not there
            found = self.store.check([key])
            recorded = self.store.get(key).decode(errors="replace") if found else ""
        except Exception:
            recorded = ""
        recorded = recorded or f"rank {self.rank}: failed (the rendezvous store is gone)"
        return (
            "the process group could not be set up from torchrun's variables, and every rank "
            f"stops (this is rank {self.rank} of {self.world_size}); {recorded}. Check that "
            "every rank calls fit as many times, with the same launcher settings"
        )

    def _call(self, op: Callable[..., _T], *args: object) -> _T:
        try:
            return op(*args)
        except DistributedError:
            raise
        except Exception as exc:
            raise DistributedError(
                f"rank {self.rank} lost the rendezvous store during the process group's "
                f"set-up ({type(exc).__name__}: {exc}); the rank or launcher serving it "
                "(MASTER_ADDR:MASTER_PORT) may have exited"
            ) from None
