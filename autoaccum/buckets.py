"""Collectives over many tensors in a few flat buckets: one collective per bucket, not per tensor.

A transformer has hundreds of parameter tensors, most of them small (biases, norms); one
all-reduce each is latency-bound. As DDP does, the tensors are packed into contiguous buckets
of about ``BUCKET_BYTES`` (25 MiB), one dtype and device each, reduced with one collective
per bucket, all issued before any is waited for, then copied back into the tensors.

The buckets are transient: allocated for the collective and freed right after (at most one
copy of the tensors, while they are reduced). A persistent flat buffer would hold that copy
for the whole run; it saves only a copy when the gradients are views into it, which needs
gradients that outlive the window (see benchmarks/RESULTS.md, "Gradient buckets").
Exactness: every element is summed across ranks exactly as by one collective per tensor.

Every rank must call with the same tensors (shapes, dtypes, devices, in the same order),
as it must for one collective per tensor: the buckets are planned from those alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from autoaccum.errors import check_count

__all__ = ["BUCKET_BYTES", "all_reduce_mean", "broadcast_from", "plan_buckets"]

#: About DDP's ``bucket_cap_mb`` (25 MiB): big enough that the latency of a collective is
#: small beside its transfer, small enough that the first buckets go out while the next are
#: being packed.
BUCKET_BYTES = 25 * 2**20


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


def _flat(members: list[torch.Tensor]) -> torch.Tensor:
    """What goes to the collective: the tensor itself when it is alone and contiguous (no
    copy), else a new contiguous buffer holding the members one after another."""
    if len(members) == 1 and (not _dense(members[0]) or members[0].is_contiguous()):
        return members[0]
    return torch.cat([t.reshape(-1) for t in members])


def _unpack(flat: torch.Tensor, members: list[torch.Tensor]) -> None:
    """Copy a bucket's result back into its members (nothing to do when it was the member)."""
    if flat is members[0]:
        return
    parts = torch.split(flat, [t.numel() for t in members])
    torch._foreach_copy_(members, [p.view(t.shape) for p, t in zip(parts, members, strict=True)])


def all_reduce_mean(
    tensors: Sequence[torch.Tensor], world_size: int, bucket_bytes: int = BUCKET_BYTES
) -> None:
    """Average ``tensors`` over the ``world_size`` ranks in place: the sum of every bucket
    (one all-reduce each, issued together, waited together), divided by ``world_size``."""
    plan = plan_buckets(tensors, bucket_bytes)
    world = check_count("world_size", world_size)
    buckets = [[tensors[i] for i in bucket] for bucket in plan]
    flats = [_flat(members) for members in buckets]
    works = [dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True) for flat in flats]
    for work in works:
        if work is not None:
            work.wait()
    dense = [flat for flat in flats if _dense(flat)]
    if dense:
        torch._foreach_div_(dense, float(world))
    for flat in flats:
        if not _dense(flat):
            flat.div_(float(world))
    for flat, members in zip(flats, buckets, strict=True):
        _unpack(flat, members)


def broadcast_from(
    tensors: Sequence[torch.Tensor], src: int = 0, bucket_bytes: int = BUCKET_BYTES
) -> None:
    """Give every rank rank ``src``'s values of ``tensors``, in place, one broadcast per
    bucket (issued together, waited together)."""
    plan = plan_buckets(tensors, bucket_bytes)
    buckets = [[tensors[i] for i in bucket] for bucket in plan]
    flats = [_flat(members) for members in buckets]
    works = [dist.broadcast(flat, src=src, async_op=True) for flat in flats]
    for work in works:
        if work is not None:
            work.wait()
    if dist.get_rank() != src:
        for flat, members in zip(flats, buckets, strict=True):
            _unpack(flat, members)
