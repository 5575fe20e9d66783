"""The benchmark workloads: a model with its data, loss and optimizer, full-size or tiny.

* ``gpt2``, ``resnet50``: the torch-only shapes of GPT-2 small and ResNet-50
  (:mod:`benchmarks.models`), AdamW and SGD with momentum, random data of fixed shape.
* ``hf-gpt2``: Hugging Face ``GPT2LMHeadModel(GPT2Config())``; ``tv-resnet50``:
  ``torchvision.models.resnet50()`` (:mod:`benchmarks.real_models`). Each is skipped, with
  the reason, where its package is not installed (:func:`missing`); neither is required.
* ``varlen-gpt2``: the GPT-2 shape on variable-length text (:mod:`benchmarks.varlen`):
  a map-style dataset, padded per micro-batch by a ``collate_fn``, a token-level loss.
* ``mlp``: a 3-layer MLP (width 1024; tiny 256) on random features, SGD: little compute
  per sample, so a loop's own cost on the host shows (bench_overhead).

All train under bf16 autocast on CUDA (each tool opens it its own way). ``tiny=True``
gives CPU-sized versions for the smoke tests, wrapped in :class:`MemoryBudget`, which
raises a real ``torch.OutOfMemoryError`` above a budget: *fault injection* that exercises
every code path on CPU, not a measurement.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from benchmarks.models import GPT, GPTConfig, ResNet, gpt_loss, resnet_loss
from benchmarks.varlen import LengthSpec, VarLenTokens, count_targets, lm_loss, pad_collate

__all__ = [
    "CAPS",
    "DEFAULT_WORKLOADS",
    "REQUIRES",
    "WORKLOADS",
    "MemoryBudget",
    "Workload",
    "autocast_for",
    "batch_len",
    "build",
    "get_workload",
    "missing",
    "slice_batch",
]

GiB = 2**30

#: The memory settings each workload runs under: a cap emulating a 24 GiB card, and the
#: whole device. On CUDA the cap is ``torch.cuda.set_per_process_memory_fraction``.
CAPS: dict[str, int | None] = {"24GiB": 24 * GiB, "uncapped": None}

Batch = Any
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
CountFn = Callable[[Batch], int]

#: The packages a workload needs beyond torch (optional: skipped, with the reason, without).
REQUIRES: dict[str, tuple[str, ...]] = {
    "hf-gpt2": ("transformers",),
    "tv-resnet50": ("torchvision",),
}


class MemoryBudget(nn.Module):
    """Fault injection for the CPU smoke mode: a micro-batch above ``budget`` samples (or,
    with ``per_token``, above ``budget`` padded tokens, ``B × L``) raises a real
    ``torch.OutOfMemoryError`` with CUDA's message, so every peer's detector sees it. It
    stands in for a card's memory; the sizes it yields are not measurements."""

    def __init__(self, model: nn.Module, budget: int, *, per_token: bool = False) -> None:
        super().__init__()
        self.model = model
        self.budget = budget
        self.per_token = per_token

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        cost = x.shape[0] * (x.shape[1] if self.per_token else 1)
        if cost > self.budget:
            unit = "padded tokens" if self.per_token else "samples"
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to run a micro-batch of {cost} {unit} "
                f"(emulated: the benchmark's fault-injection budget is {self.budget})"
            )
        return self.model(x, *args, **kwargs)


@dataclass(frozen=True)
class Workload:
    """One model with its data, loss and optimizer, full-size or tiny."""

    name: str
    tiny: bool
    build_model: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.device, int], Batch]  #: (size, device, seed) → batch
    loss_fn: LossFn
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    upper: int  #: top of every search: autoaccum's ``upper``, Accelerate's start
    target_batch: int  #: target batch of the throughput benchmark
    overhead_micro: int  #: micro-batch of the overhead benchmark
    tiny_budgets: dict[str, int]  #: fault-injection budget per cap in tiny mode
    count_fn: CountFn | None = None  #: items the mean loss is over (None: samples)
    dataset: Callable[[], Dataset[Any]] | None = None  #: map-style data (variable length)
    collate: Callable[[Sequence[Any]], Batch] | None = None  #: pads one micro-batch
    budget_per_token: bool = False  #: the tiny budget counts padded tokens, not samples
    min_micro: int = 1  #: 2 with BatchNorm

    def precision(self, device: torch.device) -> str:
        return "bf16" if device.type == "cuda" else "fp32"

    def loader(self, batch_size: int, *, seed: int | None = None) -> DataLoader[Any]:
        """A DataLoader over the map-style data (shuffled by ``seed``, or in order)."""
        if self.dataset is None:
            raise ValueError(f"{self.name} has fixed-shape data, not a dataset")
        g = None if seed is None else torch.Generator().manual_seed(seed)
        return DataLoader(
            self.dataset(),
            batch_size=batch_size,
            shuffle=seed is not None,
            generator=g,
            collate_fn=self.collate,
        )

    def probe_batch(self, device: torch.device) -> Batch:
        """The real samples a probe gets: 8 fixed-shape samples to tile, or the first
        window of ``target_batch`` variable-length samples padded together (what ``fit``
        hands its probe)."""
        if self.dataset is None:
            return self.make_batch(8, device, 0)
        return _to(next(iter(self.loader(self.target_batch))), device)

    def stream(self, size: int, device: torch.device, seed: int) -> Iterator[Batch]:
        """Micro-batches of ``size`` for a long run: one resident batch reused (fixed
        shape), or the shuffled dataset padded per micro-batch, epoch after epoch."""
        if self.dataset is None:
            return itertools.repeat(self.make_batch(size, device, seed))
        return (
            _to(batch, device)
            for epoch in itertools.count()
            for batch in self.loader(size, seed=seed + epoch)
        )


def _to(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return type(batch)(t.to(device) for t in batch)


def _gpt_batch(cfg: GPTConfig) -> Callable[[int, torch.device, int], torch.Tensor]:
    def make(size: int, device: torch.device, seed: int) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(seed)
        return torch.randint(0, cfg.vocab, (size, cfg.seq + 1), device=device, generator=g)

    return make


def image_batch(
    side: int, classes: int
) -> Callable[[int, torch.device, int], tuple[torch.Tensor, torch.Tensor]]:
    def make(size: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(seed)
        images = torch.randn(size, 3, side, side, device=device, generator=g)
        labels = torch.randint(0, classes, (size,), device=device, generator=g)
        return images, labels

    return make


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def _gpt2(tiny: bool) -> Workload:
    cfg = GPTConfig(n_layer=2, d_model=64, n_head=4, vocab=256, seq=32) if tiny else GPTConfig()
    return Workload(
        name="gpt2",
        tiny=tiny,
        build_model=lambda: GPT(cfg),
        make_batch=_gpt_batch(cfg),
        loss_fn=gpt_loss,
        make_optimizer=adamw,
        upper=256 if tiny else 1024,
        target_batch=64 if tiny else 256,
        overhead_micro=4 if tiny else 8,
        tiny_budgets={"24GiB": 15, "uncapped": 52},
    )


def _resnet50(tiny: bool) -> Workload:
    side, classes, width = (32, 10, 8) if tiny else (224, 1000, 64)
    return Workload(
        name="resnet50",
        tiny=tiny,
        build_model=lambda: ResNet((3, 4, 6, 3), width, classes, maxpool=not tiny),
        make_batch=image_batch(side, classes),
        loss_fn=resnet_loss,
        make_optimizer=sgd,
        upper=256 if tiny else 4096,
        target_batch=64 if tiny else 1024,
        overhead_micro=8 if tiny else 128,
        tiny_budgets={"24GiB": 24, "uncapped": 60},
        min_micro=2,
    )


def _varlen_gpt2(tiny: bool) -> Workload:
    if tiny:
        spec = LengthSpec(context=32, median=8.0, sigma=0.8, min_len=2, vocab=256)
        cfg = GPTConfig(n_layer=2, d_model=64, n_head=4, vocab=256, seq=32)
    else:
        spec, cfg = LengthSpec(), GPTConfig()
    count = 1 << 14 if tiny else 1 << 17

    def make_batch(size: int, device: torch.device, seed: int) -> Batch:
        data = VarLenTokens(spec, count)
        start = (seed * size) % (count - size)
        return _to(pad_collate([data[start + j] for j in range(size)]), device)

    return Workload(
        name="varlen-gpt2",
        tiny=tiny,
        build_model=lambda: GPT(cfg),
        make_batch=make_batch,
        loss_fn=lm_loss,
        make_optimizer=adamw,
        upper=256 if tiny else 1024,
        target_batch=64 if tiny else 256,
        overhead_micro=4 if tiny else 8,
        tiny_budgets={"24GiB": 15 * spec.context, "uncapped": 52 * spec.context},
        count_fn=count_targets,
        dataset=lambda: VarLenTokens(spec, count),
        collate=pad_collate,
        budget_per_token=True,
    )


def _mlp(tiny: bool) -> Workload:
    """A 3-layer MLP on random features (bench_sync's model): little compute per sample, so
    what a loop costs on the host shows."""
    width, classes = (256, 10) if tiny else (1024, 10)

    def make_batch(size: int, device: torch.device, seed: int) -> Batch:
        g = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(size, width, device=device, generator=g)
        return x, torch.randint(0, classes, (size,), device=device, generator=g)

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    return Workload(
        name="mlp",
        tiny=tiny,
        build_model=lambda: nn.Sequential(
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, classes),
        ),
        make_batch=make_batch,
        loss_fn=loss,
        make_optimizer=sgd,
        upper=256 if tiny else 8192,
        target_batch=64 if tiny else 2048,
        overhead_micro=16 if tiny else 256,
        tiny_budgets={"24GiB": 24, "uncapped": 60},
    )


def _hf_gpt2(tiny: bool) -> Workload:
    from benchmarks.real_models import hf_gpt2

    return hf_gpt2(tiny)


def _tv_resnet50(tiny: bool) -> Workload:
    from benchmarks.real_models import tv_resnet50

    return tv_resnet50(tiny)


WORKLOADS: dict[str, Callable[[bool], Workload]] = {
    "gpt2": _gpt2,
    "resnet50": _resnet50,
    "hf-gpt2": _hf_gpt2,
    "tv-resnet50": _tv_resnet50,
    "varlen-gpt2": _varlen_gpt2,
    "mlp": _mlp,
}


#: what a benchmark runs when not told: all but the MLP, which only bench_overhead uses
DEFAULT_WORKLOADS = tuple(name for name in WORKLOADS if name != "mlp")


def missing(name: str) -> str | None:
    """Why workload ``name`` cannot run here (``"torchvision not installed"``), or None."""
    absent = [m for m in REQUIRES.get(name, ()) if importlib.util.find_spec(m) is None]
    return f"{', '.join(absent)} not installed" if absent else None


def get_workload(name: str, tiny: bool) -> Workload:
    if name not in WORKLOADS:
        raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    return WORKLOADS[name](tiny)


def build(workload: Workload, cap: str, device: torch.device, seed: int = 0) -> nn.Module:
    """The workload's model on ``device``, in train mode, with the same weights every call
    (``seed``); wrapped in :class:`MemoryBudget` in tiny mode. Apply the cap first."""
    torch.manual_seed(seed)
    model: nn.Module = workload.build_model()
    if workload.tiny:
        budget = workload.tiny_budgets[cap]
        model = MemoryBudget(model, budget, per_token=workload.budget_per_token)
    return model.to(device).train()


def batch_len(batch: Batch) -> int:
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) else int(batch[0].shape[0])


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    return type(batch)(t[start:stop] for t in batch)


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast, or nothing for fp32: how the hand-written loops and peers run."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
