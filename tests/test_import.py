"""A fast start: ``import autoaccum`` imports no torch, its public names cost little on top of
torch (measured in fresh processes), the heavy optional pieces are imported only when used,
and ``autoaccum --version`` answers without torch."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import autoaccum

ROOT = Path(__file__).resolve().parents[1]
#: imported only where they are used: the console, host memory, checkpoints, the extras
LAZY = (
    "rich",
    "psutil",
    "torch.distributed.checkpoint",
    "matplotlib",
    "tensorboard",
    "torch.utils.tensorboard",
    "lightning",
    "transformers",
)
#: the import time a loaded 2-core machine may add on top of torch (measured: ~0.1-0.3 s)
BOUND_S = 1.0

MEASURE = f"""
import json, sys, time
start = time.perf_counter()
import torch
torch_s = time.perf_counter() - start
from autoaccum import *  # every public name: what a user's first autoaccum.fit pays
extra_s = time.perf_counter() - start - torch_s
print(json.dumps({{"torch": torch_s, "extra": extra_s,
                   "loaded": [m for m in {LAZY!r} if m in sys.modules]}}))
"""


def _python(code: str, cache: Path) -> subprocess.CompletedProcess[str]:
    """``python -c code`` with this checkout first, bytecode cached in ``cache`` (as an
    installed package has it: the measure is of importing, not of compiling)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONPYCACHEPREFIX"] = str(cache)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )


def test_import_autoaccum_imports_no_torch_and_the_version_command_needs_none(
    tmp_path: Path,
) -> None:
    code = (
        "import sys\n"
        "import autoaccum\n"
        "assert 'torch' not in sys.modules, 'import autoaccum imported torch'\n"
        "assert autoaccum.__version__ and autoaccum.ConfigError\n"
        "from autoaccum.cli import main\n"
        "assert main(['--version']) == 0\n"
        "assert 'torch' not in sys.modules, 'autoaccum --version imported torch'\n"
    )
    done = _python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"autoaccum {autoaccum.__version__}\n"


def test_public_names_cost_little_on_top_of_torch(tmp_path: Path) -> None:
    runs = []
    for _ in range(3):  # the first also writes the bytecode cache; the median is of the rest
        done = _python(MEASURE, tmp_path)
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout))
    assert runs[0]["loaded"] == [], f"imported at import time: {runs[0]['loaded']}"
    extra = statistics.median(r["extra"] for r in runs)
    torch_s = statistics.median(r["torch"] for r in runs)
    assert extra <= BOUND_S, (
        f"the public names took {extra:.2f} s on top of torch's {torch_s:.2f} s (bound "
        f"{BOUND_S} s): python -X importtime -c 'import autoaccum' shows what to make lazy"
    )


def test_every_public_name_resolves_and_dir_lists_them() -> None:
    for name in autoaccum.__all__:
        assert getattr(autoaccum, name) is not None, name
    assert set(autoaccum.__all__) <= set(dir(autoaccum))
    assert autoaccum.fit.__module__ == "autoaccum.train.fit"
    with pytest.raises(AttributeError, match="no attribute 'fitt'"):
        autoaccum.fitt  # noqa: B018
