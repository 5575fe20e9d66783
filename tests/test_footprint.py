"""The fixed memory of training, measured from the tensors: parameters, buffers, gradients,
optimizer state; shared storage counted once."""

from __future__ import annotations

import torch
from torch import nn

from autoaccum.memory.footprint import footprint

GiB = 2**30


def test_footprint_counts_params_grads_and_optimizer_state():
    model = nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20), nn.Linear(20, 2))
    params = sum(p.numel() * 4 for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    opt = torch.optim.AdamW(model.parameters())

    before = footprint(model, opt)
    assert before == {
        "parameters": params,
        "buffers": buffers,
        "gradients_expected": params,
        "optimizer_state": 0,
    }

    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    after = footprint(model, opt)
    n_params = len(list(model.parameters()))
    assert after["gradients"] == params
    assert "gradients_expected" not in after
    # exp_avg and exp_avg_sq per parameter, plus a float32 scalar "step" each
    assert after["optimizer_state"] == 2 * params + 4 * n_params
    assert footprint(model)["optimizer_state"] == 0


def test_footprint_counts_shared_storage_once():
    embed = nn.Embedding(100, 8)
    head = nn.Linear(8, 100, bias=False)
    head.weight = embed.weight  # tied
    model = nn.ModuleDict({"embed": embed, "head": head})
    assert footprint(model)["parameters"] == 100 * 8 * 4

    frozen = nn.Linear(4, 4)
    frozen.bias.requires_grad_(False)
    fp = footprint(frozen)
    assert fp["gradients_expected"] == 16 * 4
