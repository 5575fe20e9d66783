"""The code base stays lint-clean (ruff) and type-clean (mypy --strict), as configured in
pyproject.toml, and importing it does nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str) -> str:
    """The tool installed beside this Python (the project's venv), else one on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return found


def test_ruff_clean() -> None:
    proc = subprocess.run(
        [tool("ruff"), "check", "autoaccum", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_clean(tmp_path: Path) -> None:
    proc = subprocess.run(
        [tool("mypy"), "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_nothing_runs_at_import() -> None:
    code = (
        "import sys, autoaccum, torch\n"
        "assert 'rich' not in sys.modules, 'rich imported at import time'\n"
        "assert not torch.cuda.is_initialized()\n"
        "import torch.distributed as d\n"
        "assert not (d.is_available() and d.is_initialized())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
