"""Test doubles: fault injection on the CPU, and small real models."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from autoaccum.step.oom import OOM_TYPE as OOM  # what torch raises when allocation fails


class OOMAbove(nn.Module):
    """Identity that raises a real ``torch.OutOfMemoryError`` when the batch exceeds ``limit``.

    Put it after layers with state (BatchNorm) so that a failed trial has already
    changed something that the probe must put back.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise OOM(f"CUDA out of memory. Tried to allocate {x.shape[0]} MiB (injected)")
        return x


def bn_net(limit: int = 10**9, *, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Linear → BatchNorm → Dropout → OOM injection → ReLU → Linear."""
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.BatchNorm1d(16),
        nn.Dropout(0.1),
        OOMAbove(limit),
        nn.ReLU(),
        nn.Linear(16, 3),
    ).to(dtype)


def mlp(limit: int = 10**9, *, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), OOMAbove(limit), nn.Linear(8, 3)).to(dtype)


def hide_package(monkeypatch: pytest.MonkeyPatch, package: str, *importers: str) -> None:
    """Make ``package`` (and its submodules) unimportable for the test, and forget the
    modules in ``importers`` so that importing them again meets the missing package."""
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)
    for name in importers:
        monkeypatch.delitem(sys.modules, name, raising=False)


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` made unwritable for this process: immutable for root, else mode 0o555."""
    if os.geteuid() == 0:  # permissions do not bind root: the immutable attribute does
        try:
            done = subprocess.run(
                ["chattr", "+i", str(folder)], capture_output=True, check=False, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            done = None
        if done is None or done.returncode != 0:
            pytest.skip("cannot make a folder read-only as root here (chattr +i failed)")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True, timeout=10)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
