"""Collectives over many tensors in a few flat buckets: one collective per bucket, not per tensor.

A transformer has hundreds of parameter tensors, most of them small (biases, norms); one
all-reduce each is latency-bound. As DDP does, the tensors are packed into contiguous buckets
of about ``BUCKET_BYTES`` (25 MiB), one dtype and device each, reduced with one collective
per bucket and copied back into the tensors. A tensor alone in its bucket (one larger than a
bucket, or every tensor with ``bucket_bytes=0``) is reduced where it is, without a copy.

Memory: the packed buckets are transient, and at most ``IN_FLIGHT`` (2) of them exist at a
time, in two buffers reused from bucket to bucket: the next bucket is packed while one is on
the wire, and the extra memory stays at two buckets (50 MiB) whatever the model's size.
Issuing every bucket at once would hold one more copy of all the gradients during the
reduction (which the probe's trials never run), and a persistent flat buffer would hold it
for the whole run; benchmarks/RESULTS.md ("Gradient buckets") has what each costs.
Exactness: every element is summed across ranks exactly as by one collective per tensor.

Every rank must call with the same tensors (shapes, dtypes, devices, in the same order),
as it must for one collective per tensor: the buckets are planned from those alone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from autoaccum.errors import check_count

__all__ = [
    "BUCKET_BYTES",
    "IN_FLIGHT",
    "Buffers",
    "all_reduce_mean",
    "broadcast_from",
    "plan_buckets",
    "reserve",
]

#: The byte buffers a call packs its buckets into, by device (see :func:`reserve`).
Buffers = dict[torch.device, list[torch.Tensor]]

#: About DDP's ``bucket_cap_mb`` (25 MiB): big enough that the latency of a collective is
#: small beside its transfer, small enough that the first buckets go out while the next are
#: being packed.
BUCKET_BYTES = 25 * 2**20
#: Packed buckets outstanding at once (see the module's docstring).
IN_FLIGHT = 2


def _dense(tensor: torch.Tensor) -> bool:
    """Only dense tensors are packed; a sparse one goes to its collective on its own, as it is."""
    return tensor.layout == torch.strided


def plan_buckets(
    tensors: Sequence[torch.Tensor], bucket_bytes: int = BUCKET_BYTES
) -> list[list[int]]:
    """The indices of ``tensors`` in buckets, in the order of each bucket's first tensor.

    A bucket holds tensors of one dtype and one device, in their order, and at most
    ``bucket_bytes`` of them; a tensor larger than that is alone. With
    ``bucket_bytes=0`` every tensor is its own bucket (one collective per tensor).
    """
    cap = check_count("bucket_bytes", bucket_bytes, minimum=0)
    closed: list[list[int]] = []
    open_: dict[tuple[torch.dtype, torch.device], tuple[list[int], int]] = {}
    for index, tensor in enumerate(tensors):
        nbytes = tensor.numel() * tensor.element_size()
        if not _dense(tensor) or cap == 0 or nbytes > cap:
            closed.append([index])  # alone; the open bucket of its dtype stays open
            continue
        key = (tensor.dtype, tensor.device)
        bucket, size = open_.get(key, ([], 0))
        if bucket and size + nbytes > cap:
            closed.append(bucket)
            bucket, size = [], 0
        bucket.append(index)
        open_[key] = (bucket, size + nbytes)
    closed.extend(bucket for bucket, _ in open_.values() if bucket)
    return sorted(closed, key=lambda bucket: bucket[0])


def _packed(members: list[torch.Tensor]) -> bool:
    """Whether a bucket goes through a packed copy: not when it is one contiguous (or sparse)
    tensor, which goes to its collective as it is."""
    if len(members) > 1:
        return True
    return _dense(members[0]) and not members[0].is_contiguous()


def _unpack(flat: torch.Tensor, members: list[torch.Tensor]) -> None:
    """Copy a packed bucket's result back into its members."""
    parts = torch.split(flat, [t.numel() for t in members])
    torch._foreach_copy_(members, [p.view(t.shape) for p, t in zip(parts, members, strict=True)])


def _nbytes(members: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in members)


def _largest(buckets: list[list[torch.Tensor]]) -> dict[torch.device, int]:
    """The bytes of each device's largest packed bucket."""
    largest: dict[torch.device, int] = {}
    for members in buckets:
        if _packed(members):
            device = members[0].device
            largest[device] = max(largest.get(device, 0), _nbytes(members))
    return largest


def reserve(
    tensors: Sequence[torch.Tensor], bucket_bytes: int = BUCKET_BYTES, in_flight: int = IN_FLIGHT
) -> Buffers:
    """The byte buffers a call over ``tensors`` packs its buckets into, allocated now: where
    running out of memory can still be told to the other ranks, before any collective."""
    buckets = [[tensors[i] for i in bucket] for bucket in plan_buckets(tensors, bucket_bytes)]
    largest = _largest(buckets)
    count = {d: sum(_packed(m) and m[0].device == d for m in buckets) for d in largest}
    return {
        device: [
            torch.empty(size, dtype=torch.uint8, device=device)
            for _ in range(min(in_flight, count[device]))
        ]
        for device, size in largest.items()
    }


def _run(
    tensors: Sequence[torch.Tensor],
    bucket_bytes: int,
    issue: Callable[[torch.Tensor], Any],
    finish: Callable[[torch.Tensor, list[torch.Tensor]], None],
    in_flight: int,
    buffers: Buffers | None = None,
) -> list[torch.Tensor]:
    """Issue ``issue(flat)`` for every bucket in order, at most ``in_flight`` packed ones
    outstanding; each packed bucket is waited for and ``finish``-ed (oldest first) before the
    next is packed when there is no room, the rest at the end. Returns the tensors that went
    as they were (their collective is complete).

    The packed buckets go through at most ``in_flight`` byte buffers per device, each as
    large as the largest bucket and reused for bucket after bucket (any dtype): the pages
    are touched once per call, not once per bucket (on the CPU, fresh pages cost more than
    the copy); ``buffers`` (of :func:`reserve`) are used first."""
    buckets = [[tensors[i] for i in bucket] for bucket in plan_buckets(tensors, bucket_bytes)]
    largest = _largest(buckets)
    given = buffers or {}
    spare: Buffers = {device: list(given.get(device, [])) for device in largest}
    pending: deque[tuple[torch.Tensor, list[torch.Tensor], Any, torch.Tensor | None]] = deque()
    as_is: list[torch.Tensor] = []
    packed = 0

    def settle() -> None:
        nonlocal packed
        flat, members, work, raw = pending.popleft()
        if work is not None:
            work.wait()
        if raw is None:
            as_is.append(flat)
            return
        packed -= 1
        finish(flat, members)
        spare[raw.device].append(raw)

    for members in buckets:
        if not _packed(members):
            pending.append((members[0], members, issue(members[0]), None))
            continue
        while packed >= in_flight:
            settle()
        device, dtype = members[0].device, members[0].dtype
        free = spare[device]
        raw = free.pop() if free else torch.empty(largest[device], dtype=torch.uint8, device=device)
        flat = raw[: _nbytes(members)].view(dtype)
        torch.cat([t.reshape(-1) for t in members], out=flat)
        packed += 1
        pending.append((flat, members, issue(flat), raw))
    while pending:
        settle()
    return as_is


def all_reduce_mean(
    tensors: Sequence[torch.Tensor],
    world_size: int,
    bucket_bytes: int = BUCKET_BYTES,
    *,
    in_flight: int = IN_FLIGHT,
    buffers: Buffers | None = None,
) -> None:
    """Average ``tensors`` over the ``world_size`` ranks in place: the sum of every bucket
    (one all-reduce each, asynchronous), divided by ``world_size``; ``buffers``: those
    :func:`reserve` took for these tensors."""
    world = float(check_count("world_size", world_size))
    check_count("bucket_bytes", bucket_bytes, minimum=0)
    check_count("in_flight", in_flight)

    def issue(flat: torch.Tensor) -> Any:
        return dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)

    def finish(flat: torch.Tensor, members: list[torch.Tensor]) -> None:
        flat.div_(world)
        _unpack(flat, members)

    as_is = _run(tensors, bucket_bytes, issue, finish, in_flight, buffers)
    dense = [t for t in as_is if _dense(t)]
    if dense:
        torch._foreach_div_(dense, world)
    for tensor in as_is:
        if not _dense(tensor):
            tensor.div_(world)


def broadcast_from(
    tensors: Sequence[torch.Tensor], src: int = 0, bucket_bytes: int = BUCKET_BYTES
) -> None:
    """Give every rank rank ``src``'s values of ``tensors``, in place, one broadcast per
    bucket (asynchronous)."""
    check_count("bucket_bytes", bucket_bytes, minimum=0)
    receive = dist.get_rank() != src

    def issue(flat: torch.Tensor) -> Any:
        return dist.broadcast(flat, src=src, async_op=True)

    def finish(flat: torch.Tensor, members: list[torch.Tensor]) -> None:
        if receive:
            _unpack(flat, members)

    _run(tensors, bucket_bytes, issue, finish, IN_FLIGHT)
