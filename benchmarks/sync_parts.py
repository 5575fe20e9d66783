"""What bench_sync reduces: the models (one with many small tensors, the MLPs), their data,
and two other ways to hold the buckets, measured against the library's.

``autoaccum.buckets`` packs the gradients into transient buckets, at most two at a time, and
copies the result back (two buckets of extra memory while the reduction runs, none after).
bench_sync also runs it with every bucket packed at once (one extra copy of all the
gradients while the reduction runs), and two others, here:

* ``persistent``: one flat buffer per bucket allocated once and kept for the run (the same
  copies, no allocation per window, one more copy of the gradients held all the time);
* ``views``: transient buckets, but each gradient becomes a view into its bucket instead of
  being copied back (one copy fewer; the gradient tensors are replaced by new ones).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from autoaccum.buckets import BUCKET_BYTES, plan_buckets

__all__ = ["MODELS", "PersistentBuckets", "build", "dataset", "reduce_into_views"]

#: name → (kind, width): ``blocks`` is 48 transformer blocks of width 256 (580 tensors, 145
#: MiB of float32 gradients), ``blocks64`` the same at width 64 (580 tensors, 9 MiB: where
#: latency dominates), ``mlp`` the MLPs bench_sync measured before buckets (6 tensors)
MODELS = {
    "blocks": ("blocks", 256),
    "blocks64": ("blocks", 64),
    "mlp1024": ("mlp", 1024),
    "mlp2048": ("mlp", 2048),
}
TOKENS = 8  #: sequence length of the blocks model's samples (small: the reduction is measured)
CLASSES = 10


class Block(nn.Module):
    """A pre-norm transformer block: 12 tensors (2 norms, qkv, projection, 4× MLP)."""

    def __init__(self, width: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, w // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        x = x + self.proj(att.reshape(b, t, w))
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


class Blocks(nn.Module):
    """``depth`` blocks, a final norm and a classifier over the mean token: 12·depth + 4 tensors."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(width) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def build(name: str, tiny: bool = False) -> nn.Module:
    """The model, with the same weights on every rank (seed 0)."""
    kind, width = MODELS[name]
    torch.manual_seed(0)
    if kind == "blocks":
        return Blocks(16, 3) if tiny else Blocks(width, 48)
    width = 32 if tiny else width
    return nn.Sequential(
        nn.Linear(width, width),
        nn.GELU(),
        nn.Linear(width, width),
        nn.GELU(),
        nn.Linear(width, CLASSES),
    )


def dataset(name: str, n: int, tiny: bool = False) -> TensorDataset:
    kind, width = MODELS[name]
    gen = torch.Generator().manual_seed(1)
    width = (16 if kind == "blocks" else 32) if tiny else width
    shape = (n, TOKENS, width) if kind == "blocks" else (n, width)
    return TensorDataset(
        torch.randn(shape, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)
    )


def _issue_all(flats: list[torch.Tensor], world: int) -> None:
    works = [dist.all_reduce(f, async_op=True) for f in flats]
    for work in works:
        if work is not None:
            work.wait()
    torch._foreach_div_(flats, float(world))


class PersistentBuckets:
    """Flat buffers allocated once for ``params``' gradients, kept between reductions."""

    def __init__(self, params: list[nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> None:
        self.plan = plan_buckets(params, bucket_bytes)
        self.flats = [params[b[0]].new_empty(sum(params[i].numel() for i in b)) for b in self.plan]

    def reduce(self, params: list[nn.Parameter], world: int) -> None:
        grads = [p.grad for p in params]
        for bucket, flat in zip(self.plan, self.flats, strict=True):
            torch.cat([grads[i].reshape(-1) for i in bucket], out=flat)  # type: ignore[union-attr]
        _issue_all(self.flats, world)
        for bucket, flat in zip(self.plan, self.flats, strict=True):
            parts = torch.split(flat, [params[i].numel() for i in bucket])
            for i, part in zip(bucket, parts, strict=True):
                grads[i].copy_(part.view(params[i].shape))  # type: ignore[union-attr]


def reduce_into_views(params: list[nn.Parameter], world: int) -> None:
    """Transient buckets whose slices become the gradients (no copy back)."""
    plan = plan_buckets(params)
    flats = [torch.cat([params[i].grad.reshape(-1) for i in b]) for b in plan]  # type: ignore[union-attr]
    _issue_all(flats, world)
    for bucket, flat in zip(plan, flats, strict=True):
        parts = torch.split(flat, [params[i].numel() for i in bucket])
        for i, part in zip(bucket, parts, strict=True):
            params[i].grad = part.view(params[i].shape)
