"""The tests' torchrun launcher (tests/launch.py): a hang ends at the bound, shows where each
rank was, and leaves no process behind, the ranks' own children included."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
from launch import torchrun

pytestmark = pytest.mark.distributed

HANGS = """
import os, subprocess, sys, threading, time
from pathlib import Path

def rank0_sleeps_here():
    time.sleep(3600)

def rank1_waits_there():
    threading.Event().wait()

# a process of the rank's own, as a DataLoader worker would be (no stack asked of it)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
Path(sys.argv[1], "pids" + os.environ["RANK"]).write_text(f"{os.getpid()} {child.pid}")
rank0_sleeps_here() if os.environ["RANK"] == "0" else rank1_waits_there()
"""


def test_a_hang_ends_at_the_bound_with_each_ranks_stack(tmp_path: Path) -> None:
    script = tmp_path / "hangs.py"
    script.write_text(HANGS)
    launch = torchrun(script, str(tmp_path), folder=tmp_path, bound=20.0)
    report = launch.report()
    assert launch.returncode is None, report
    assert "(a hang)" in report
    assert "in rank0_sleeps_here" in launch.rank_logs[0], report
    assert "in rank1_waits_there" in launch.rank_logs[1], report
    pids = [int(pid) for r in (0, 1) for pid in (tmp_path / f"pids{r}").read_text().split()]
    deadline = time.monotonic() + 10  # killed; a moment for the reaping
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(pid) for pid in pids)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
