"""The real models next to the torch-only shapes: Hugging Face GPT-2 and torchvision ResNet-50.

Both are built from their configurations (random weights: nothing is downloaded) and
imported only when built, so neither package is needed to import the benchmarks; a
workload whose package is missing is reported as skipped (:func:`benchmarks.workloads.missing`).

* ``hf-gpt2``: ``GPT2LMHeadModel(GPT2Config())`` (124 M parameters, context 1024, dropout
  0.1 as configured), its own shifted loss through ``labels=``; AdamW. Tiny: 2 layers,
  d=64, 4 heads, vocabulary 256, context 32.
* ``tv-resnet50``: ``torchvision.models.resnet50(weights=None)`` on 224×224, 1000 classes;
  SGD with momentum. Tiny: the same network on 32×32 images and 10 classes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from benchmarks.models import resnet_loss
from benchmarks.workloads import Workload, adamw, image_batch, sgd

__all__ = ["hf_gpt2", "tv_resnet50"]


def _hf_config(tiny: bool) -> Any:
    from transformers import GPT2Config

    if tiny:
        return GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=32)
    return GPT2Config()


def hf_gpt2(tiny: bool) -> Workload:
    seq, vocab = (32, 256) if tiny else (1024, 50257)

    def build_model() -> nn.Module:
        from transformers import GPT2LMHeadModel
        from transformers.utils import logging

        logging.set_verbosity_error()
        return GPT2LMHeadModel(_hf_config(tiny))

    def make_batch(size: int, device: torch.device, seed: int) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(seed)
        return torch.randint(0, vocab, (size, seq), device=device, generator=g)

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor = model(batch, labels=batch).loss  # shifted inside the model
        return loss

    return Workload(
        name="hf-gpt2",
        tiny=tiny,
        build_model=build_model,
        make_batch=make_batch,
        loss_fn=loss_fn,
        make_optimizer=adamw,
        upper=256 if tiny else 1024,
        target_batch=64 if tiny else 256,
        overhead_micro=4 if tiny else 8,
        tiny_budgets={"24GiB": 15, "uncapped": 52},
    )


def tv_resnet50(tiny: bool) -> Workload:
    side, classes = (32, 10) if tiny else (224, 1000)

    def build_model() -> nn.Module:
        from torchvision.models import resnet50

        model: nn.Module = resnet50(weights=None, num_classes=classes)
        return model

    return Workload(
        name="tv-resnet50",
        tiny=tiny,
        build_model=build_model,
        make_batch=image_batch(side, classes),
        loss_fn=resnet_loss,
        make_optimizer=sgd,
        upper=256 if tiny else 4096,
        target_batch=64 if tiny else 1024,
        overhead_micro=8 if tiny else 128,
        tiny_budgets={"24GiB": 24, "uncapped": 60},
        min_micro=2,
    )
