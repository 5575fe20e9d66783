"""What the distributed tests and their workers share beyond tests/reference.py."""

from __future__ import annotations

import torch
from helpers import OOMAbove
from torch import nn

WORLD = 2


def bn_mlp(limit: int = 10**9, seed: int = 0) -> nn.Sequential:
    """Like ``helpers.mlp`` with a BatchNorm: DDP broadcasts its buffers on every forward."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), OOMAbove(limit), nn.Linear(8, 3)
    ).double()
