"""Multi-process launches for the tests, the way users launch: torchrun, bounded.

``torchrun --standalone`` picks a free rendezvous port, so launches may run side by side. Each
rank's stdout and stderr go to files of their own (torchrun's ``--log-dir`` and
``--redirects``). The launch runs in a session of its own and its whole process tree is
killed at the bound; just before, every rank is sent SIGABRT, on which Python's faulthandler
(``PYTHONFAULTHANDLER``) writes every thread's stack to that rank's stderr, so a hang fails
with where each rank was. No core files are written; the launch runs in its folder.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

#: what a launcher (torchrun, Lightning, a test's own environment) may have set: cleared, so
#: that a launch from inside a distributed job starts a job of its own
LAUNCHER_VARS = (
    "MASTER_",
    "RANK",
    "LOCAL_",
    "WORLD_",
    "GROUP_",
    "ROLE_",
    "NODE_RANK",
    "TORCHELASTIC",
    "PL_",
)
STACK_GRACE = 3.0  #: seconds the ranks get to write their stacks before the kill
SHOWN = 6000  #: characters of each log shown in a failure


@dataclass(frozen=True)
class Launch:
    """How a launch ended: torchrun's exit code (None: killed at the bound) and the logs."""

    command: str
    returncode: int | None
    bound: float
    launcher_log: str
    rank_logs: dict[int, str]

    def report(self) -> str:
        """What a failing test shows: how the launch ended, then each rank's output."""
        ended = (
            f"still running after {self.bound:g}s (a hang): each rank's stack is at the end "
            "of its log"
            if self.returncode is None
            else f"torchrun exited with {self.returncode}"
        )
        parts = [f"{self.command}\n{ended}", f"----- torchrun -----\n{_tail(self.launcher_log)}"]
        parts += [f"----- rank {r} -----\n{_tail(log)}" for r, log in self.rank_logs.items()]
        return "\n".join(parts)


def torchrun(
    script: Path,
    *args: str,
    folder: Path,
    bound: float,
    nproc: int = 2,
    env: dict[str, str] | None = None,
) -> Launch:
    """Run ``script args`` on ``nproc`` ranks under torchrun, within ``bound`` seconds."""
    logs = folder / "torchrun-logs"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--log-dir={logs}",
        "--redirects=3",
        str(script),
        *args,
    ]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    full_env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    full_env.update(env or {})
    launcher_log = folder / "torchrun.log"
    with launcher_log.open("w") as out, _no_core_files():
        proc = subprocess.Popen(
            command,
            cwd=folder,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        returncode: int | None = proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        _end(proc, hung=proc.poll() is None)
    return Launch(
        command=" ".join(command[1:]),
        returncode=returncode,
        bound=bound,
        launcher_log=launcher_log.read_text(errors="replace"),
        rank_logs=_rank_logs(logs, nproc),
    )


def run(
    script: Path,
    *args: str,
    folder: Path,
    bound: float,
    nproc: int = 2,
    env: dict[str, str] | None = None,
) -> Launch:
    """:func:`torchrun`, failing the test (with every rank's output) unless it succeeded."""
    launch = torchrun(script, *args, folder=folder, bound=bound, nproc=nproc, env=env)
    if launch.returncode != 0:
        pytest.fail(launch.report(), pytrace=False)
    return launch


@contextlib.contextmanager
def _no_core_files() -> Iterator[None]:
    """No core files from what starts meanwhile (a rank aborted for its stack): the limit is
    inherited (a preexec_fn is unsafe in a process with threads, as pytest-xdist's are)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


def _end(proc: subprocess.Popen[bytes], hung: bool) -> None:
    """End everything the launch started: torchrun's session, and each rank's (torchrun starts
    every rank in a session of its own, where its loader workers are too). A hung launch's
    ranks are sent SIGABRT first: faulthandler writes their stacks, then they end. torchrun
    is stopped (SIGSTOP) before that: seeing one rank abort, it would otherwise SIGTERM the
    others before they have written theirs."""
    try:
        ranks = psutil.Process(proc.pid).children() if hung else []
    except psutil.Error:
        ranks = []
    if ranks:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signal.SIGSTOP)
        for rank in ranks:
            with contextlib.suppress(psutil.Error):
                rank.send_signal(signal.SIGABRT)
        psutil.wait_procs(ranks, timeout=STACK_GRACE)
    for group in [proc.pid, *(rank.pid for rank in ranks)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    proc.wait()


def _rank_logs(logs: Path, nproc: int) -> dict[int, str]:
    """Each rank's stdout then stderr, as torchrun wrote them (the latest attempt's)."""
    found: dict[int, str] = {}
    for rank in range(nproc):
        texts = []
        for stream in ("stdout", "stderr"):
            paths = sorted(logs.glob(f"*/attempt_*/{rank}/{stream}.log"), key=os.path.getmtime)
            if paths:
                texts.append(paths[-1].read_text(errors="replace"))
        found[rank] = "".join(texts) if texts else "(no log: the rank never started)"
    return found


def _tail(text: str) -> str:
    return text if len(text) <= SHOWN else f"[…{len(text) - SHOWN} characters…]\n{text[-SHOWN:]}"
