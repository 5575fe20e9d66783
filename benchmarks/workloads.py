"""The benchmark workloads, defined with torch alone.

Two models, each with a synthetic batch generator (fixed seed), a ``loss_fn(model, batch)``
returning the mean loss, and its optimizer:

* ``gpt2``: a GPT-2-small-shaped decoder (12 layers, d=768, 12 heads, vocab 50257,
  seq 1024, tied embeddings, GELU MLP 4×, ``scaled_dot_product_attention(is_causal=True)``),
  AdamW. A batch is a ``(B, seq + 1)`` token tensor: inputs are the first ``seq`` tokens,
  targets the next ones.
* ``resnet50``: a ResNet-50-shaped CNN (bottleneck blocks [3, 4, 6, 3], 224×224,
  1000 classes), SGD with momentum 0.9. A batch is ``(images, labels)``.

Both train under bf16 autocast on CUDA (the caller opens the autocast context; each tool
does it its own way). ``tiny=True`` gives CPU-sized versions (a 2-layer d=64 decoder on
32 tokens with a 256-token vocabulary; the same bottleneck structure with 8 base channels
at 32×32, no stem max-pool, and 10 classes) for smoke tests. In tiny mode the model is wrapped in
:class:`MemoryBudget`, which raises a real ``torch.OutOfMemoryError`` above a micro-batch
budget: *fault injection* that exercises every code path on CPU, not a measurement.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CAPS",
    "WORKLOADS",
    "MemoryBudget",
    "Workload",
    "autocast_for",
    "batch_len",
    "build",
    "get_workload",
    "slice_batch",
]

GiB = 2**30

#: The memory settings each workload runs under: a cap emulating a 24 GiB card, and the
#: whole device. On CUDA the cap is ``torch.cuda.set_per_process_memory_fraction``.
CAPS: dict[str, int | None] = {"24GiB": 24 * GiB, "uncapped": None}

Batch = Any
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


# --------------------------------------------------------------------------- GPT-2 small


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 12
    d_model: int = 768
    n_head: int = 12
    vocab: int = 50257
    seq: int = 1024


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        shape = (b, t, self.n_head, c // self.n_head)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * cfg.d_model, cfg.d_model),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A GPT-2-shaped decoder: learned positions, pre-LayerNorm blocks, tied LM head."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied embeddings, as in GPT-2
        self.apply(_init_gpt)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _init_gpt(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def gpt_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over a ``(B, seq + 1)`` token batch."""
    logits = model(batch[:, :-1])
    targets = batch[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# --------------------------------------------------------------------------- ResNet-50


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3×3 convolution."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        layers: tuple[int, ...] = (3, 4, 6, 3),
        width: int = 64,
        num_classes: int = 1000,
        maxpool: bool = True,
    ) -> None:
        super().__init__()
        # The tiny 32×32 variant drops the stem's max-pool so that the last stage is still
        # 2×2 (BatchNorm needs more than one value per channel at micro-batch 1).
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1) if maxpool else nn.Identity(),
        )
        stages: list[nn.Module] = []
        inplanes = width
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(Bottleneck(inplanes, planes, stride))
                inplanes = planes * Bottleneck.expansion
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


# --------------------------------------------------------------------------- fault injection


class MemoryBudget(nn.Module):
    """Fault injection for the CPU smoke mode: a micro-batch above ``budget`` samples raises
    a real ``torch.OutOfMemoryError`` (with CUDA's message, so every peer's detector sees
    it). It stands in for a card's memory so the searches and the fresh-run bisection have
    a limit to find on CPU; the sizes it yields are not measurements."""

    def __init__(self, model: nn.Module, budget: int) -> None:
        super().__init__()
        self.model = model
        self.budget = budget

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.budget:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to run a micro-batch of {x.shape[0]} samples "
                f"(emulated: the benchmark's fault-injection budget is {self.budget})"
            )
        return self.model(x)


# --------------------------------------------------------------------------- workloads


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
    target_batch: int  #: target batch for the throughput benchmark
    overhead_micro: int  #: micro-batch of the overhead benchmark
    tiny_budgets: dict[str, int]  #: fault-injection budget per cap in tiny mode

    def precision(self, device: torch.device) -> str:
        return "bf16" if device.type == "cuda" else "fp32"


def _gpt_batch(cfg: GPTConfig) -> Callable[[int, torch.device, int], torch.Tensor]:
    def make(size: int, device: torch.device, seed: int) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(seed)
        return torch.randint(0, cfg.vocab, (size, cfg.seq + 1), device=device, generator=g)

    return make


def _image_batch(
    side: int, classes: int
) -> Callable[[int, torch.device, int], tuple[torch.Tensor, torch.Tensor]]:
    def make(size: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(seed)
        images = torch.randn(size, 3, side, side, device=device, generator=g)
        labels = torch.randint(0, classes, (size,), device=device, generator=g)
        return images, labels

    return make


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def _gpt2(tiny: bool) -> Workload:
    cfg = GPTConfig(n_layer=2, d_model=64, n_head=4, vocab=256, seq=32) if tiny else GPTConfig()
    return Workload(
        name="gpt2",
        tiny=tiny,
        build_model=lambda: GPT(cfg),
        make_batch=_gpt_batch(cfg),
        loss_fn=gpt_loss,
        make_optimizer=_adamw,
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
        make_batch=_image_batch(side, classes),
        loss_fn=resnet_loss,
        make_optimizer=_sgd,
        upper=256 if tiny else 4096,
        target_batch=64 if tiny else 1024,
        overhead_micro=8 if tiny else 128,
        tiny_budgets={"24GiB": 24, "uncapped": 60},
    )


WORKLOADS: dict[str, Callable[[bool], Workload]] = {"gpt2": _gpt2, "resnet50": _resnet50}


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
        model = MemoryBudget(model, workload.tiny_budgets[cap])
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
