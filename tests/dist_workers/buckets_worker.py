"""One rank of the bucketed-reduction test: ``python buckets_worker.py RANK PORT OUTDIR``.

Each rank gives a model of mixed parameters its own gradients, then averages them over the
ranks three ways from the same starting gradients: one all-reduce per parameter (the path
before buckets, written out here) and ``autoaccum.distributed.reduce_gradients`` with the
default buckets, small buckets and none. The buffers are broadcast the same way. Saves
what the test asserts on to ``OUTDIR/rank{RANK}.pt`` (tensors, lists and numbers only).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: dist_workers

import torch
import torch.distributed as dist
from torch import nn

from autoaccum import distributed as D
from autoaccum.buckets import BUCKET_BYTES
from dist_workers.common import WORLD

TIMEOUT = timedelta(seconds=30)
#: one float64 parameter larger than a default bucket (it is reduced alone, in place)
BIG = BUCKET_BYTES // 8 + 1000
#: buckets small enough that the small parameters spread over several, several in each
SMALL_BUCKETS = 1024
CONFIGS = {"default": BUCKET_BYTES, "small": SMALL_BUCKETS, "none": 0}


class Mixed(nn.Module):
    """Uneven sizes, three dtypes interleaved, a parameter larger than a bucket, one without a
    gradient anywhere, one with a gradient on rank 0 only, a frozen one, a non-contiguous
    gradient, and buffers of two dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(7, 13).double()
        self.f32 = nn.Linear(5, 3)
        self.bf16 = nn.Parameter(torch.zeros(11, dtype=torch.bfloat16))
        self.b = nn.Linear(13, 1).double()
        self.big = nn.Parameter(torch.zeros(BIG, dtype=torch.float64))
        self.unused = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
        self.rank0_only = nn.Parameter(torch.zeros(6, dtype=torch.float64))
        self.frozen = nn.Parameter(torch.zeros(5, dtype=torch.float64), requires_grad=False)
        self.transposed = nn.Parameter(torch.zeros(9, 4, dtype=torch.float64))
        self.norm = nn.BatchNorm1d(3)  # float32 running stats, an int64 counter
        self.register_buffer("scale", torch.zeros(17, dtype=torch.float64))


def local_grads(model: Mixed, rank: int) -> list[torch.Tensor | None]:
    """This rank's own gradients (a seed per rank): what its micro-steps would have left."""
    gen = torch.Generator().manual_seed(100 + rank)
    out: list[torch.Tensor | None] = []
    for name, p in model.named_parameters():
        if not p.requires_grad or name == "unused" or (name == "rank0_only" and rank != 0):
            out.append(None)
        elif name == "transposed":
            out.append(torch.randn(4, 9, dtype=p.dtype, generator=gen).t())  # non-contiguous
        else:
            out.append(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return out


def set_grads(model: nn.Module, local: list[torch.Tensor | None]) -> None:
    for p, g in zip(model.parameters(), local, strict=True):
        p.grad = None if g is None else g.clone()


def per_parameter(model: nn.Module) -> None:
    """The reduction before buckets: one all-reduce per trainable parameter, then ÷ world."""
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(WORLD)


@contextmanager
def counting(calls: dict[str, int]) -> Iterator[None]:
    """Count the collectives issued (each call goes on to torch.distributed's own)."""
    real: dict[str, Callable[..., Any]] = {n: getattr(dist, n) for n in calls}

    def counter(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real[name](*args, **kwargs)

        return call

    for name in calls:
        setattr(dist, name, counter(name))
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


def grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def local_buffers(model: nn.Module, rank: int) -> None:
    gen = torch.Generator().manual_seed(200 + rank)
    for b in model.buffers():
        if b.is_floating_point():
            b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64))
        else:
            b.fill_(10 + rank)


def main() -> None:
    rank, port, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=TIMEOUT
    )
    torch.set_num_threads(1)
    info = D.current()
    torch.manual_seed(0)
    model = Mixed()
    saved: dict[str, Any] = {"names": [n for n, _ in model.named_parameters()]}
    local = local_grads(model, rank)
    saved["local"] = local
    set_grads(model, local)
    per_parameter(model)
    saved["per_parameter"] = grads(model)
    for config, bucket_bytes in CONFIGS.items():
        set_grads(model, local)
        before = [p.grad for p in model.parameters()]
        calls = {"all_reduce": 0}
        with counting(calls):
            D.reduce_gradients(model, info, bucket_bytes=bucket_bytes)
        saved[f"reduced/{config}"] = grads(model)
        saved[f"kept/{config}"] = [
            b is None or p.grad is b for p, b in zip(model.parameters(), before, strict=True)
        ]
        saved[f"all_reduces/{config}"] = calls["all_reduce"]
        local_buffers(model, rank)
        saved["buffers_before"] = [b.clone() for b in model.buffers()]
        calls = {"broadcast": 0}
        with counting(calls):
            D.broadcast_buffers(model, info, bucket_bytes=bucket_bytes)
        saved[f"buffers/{config}"] = [b.clone() for b in model.buffers()]
        saved[f"broadcasts/{config}"] = calls["broadcast"]
    torch.save(saved, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
