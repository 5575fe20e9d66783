"""What every benchmark shares: the environment, devices and caps, arguments, worker processes.

Output (tables, JSON files) is in :mod:`benchmarks.tables`."""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:  # the package's one place that resolves a CUDA index (it moved during issue 10's layout)
    from autoaccum.device import cuda_index
except ImportError:  # pragma: no cover - the earlier layout
    from autoaccum.probing.device import cuda_index  # type: ignore[no-redef]
from benchmarks.workloads import CAPS, DEFAULT_WORKLOADS, WORKLOADS, missing

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "out"

#: A worker prints its result as one line ``BENCH_RESULT {json}`` on stdout (peers log there too).
RESULT_MARKER = "BENCH_RESULT "
EXIT_OK = 0
EXIT_OOM = 3

#: The peers, by the module that provides them (first one importable wins).
PEER_MODULES: dict[str, tuple[str, ...]] = {
    "lightning": ("lightning", "pytorch_lightning"),
    "accelerate": ("accelerate",),
    "composer": ("composer",),
}


# --------------------------------------------------------------------------- environment


def peer_module(peer: str) -> str | None:
    """The importable module that provides ``peer``, or None when it is not installed."""
    for name in PEER_MODULES[peer]:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def env_info(device: torch.device) -> dict[str, Any]:
    """Card, versions and date: the header of every result."""
    info: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "autoaccum": _version("autoaccum"),
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "total_memory_gib": None,
        "cpu_threads": torch.get_num_threads(),
        "peers": {
            peer: (_version(mod.replace("_", "-")) if mod else None)
            for peer in PEER_MODULES
            for mod in [peer_module(peer)]
        },
    }
    if device.type == "cuda":
        name, total = _gpu_props(device)
        info["device_name"] = name
        info["total_memory_gib"] = round(total / 2**30, 1)
    return info


def _gpu_props(device: torch.device) -> tuple[str, int]:
    """The card's name and memory, through NVML when possible: an orchestrating process
    must not create a CUDA context, which would hold device memory its workers need."""
    if not torch.cuda.is_initialized():
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
                name = pynvml.nvmlDeviceGetName(handle)
                total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            finally:
                pynvml.nvmlShutdown()
            return (name.decode() if isinstance(name, bytes) else str(name)), total
        except Exception:  # no NVML: ask torch (this does initialise CUDA)
            pass
    props = torch.cuda.get_device_properties(device)
    return props.name, int(props.total_memory)


def env_line(env: dict[str, Any]) -> str:
    card = env["device_name"] if env["device"] != "cpu" else f"CPU ({env['device_name']})"
    mem = f", {env['total_memory_gib']} GiB" if env.get("total_memory_gib") else ""
    peers = ", ".join(f"{k} {v or 'not installed'}" for k, v in env["peers"].items())
    return f"{card}{mem}; torch {env['torch']}; {env['date']}; {peers}"


def pick_device(tiny: bool) -> torch.device:
    if tiny:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device: these benchmarks measure GPU memory and time. "
            "Use --tiny for the CPU smoke mode (fault-injected OOM, not a measurement)."
        )
    return torch.device("cuda")  # no index query: orchestrators must not initialise CUDA


def apply_cap(cap: str, device: torch.device) -> None:
    """Emulate a smaller card: cap this process's share of the device's memory.

    In tiny mode the cap is a fault-injection budget set on the model instead.
    """
    cap_bytes = CAPS[cap]
    if device.type != "cuda":
        return
    index = cuda_index(device)
    total = torch.cuda.get_device_properties(index).total_memory
    # "uncapped" sets the fraction back to 1: one process may measure several caps in turn.
    fraction = 1.0 if cap_bytes is None else min(1.0, cap_bytes / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)  # needs an index


def configure_threads(tiny: bool) -> None:
    """In tiny mode one intra-op thread per process: the smoke runs are many small processes
    on a small CI box, where thread oversubscription costs more than it gains."""
    if tiny:
        torch.set_num_threads(1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Give the device's cached memory back (CUDA; nothing to do on CPU, where a full
    garbage collection would only cost time)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """Allocator peak since :func:`reset_peak` on CUDA; None on CPU (not measured there)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


# --------------------------------------------------------------------------- arguments


def csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_common_args(parser: argparse.ArgumentParser, *, caps: str = "24GiB,uncapped") -> None:
    parser.add_argument(
        "--tiny", action="store_true", help="CPU smoke mode: tiny models, fault-injected OOM"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where JSON and markdown go")
    parser.add_argument(
        "--workloads",
        type=csv,
        default=list(DEFAULT_WORKLOADS),
        help="comma-separated, from " + ",".join(WORKLOADS),
    )
    parser.add_argument(
        "--caps", type=csv, default=csv(caps), help="comma-separated: 24GiB,uncapped"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="unix time after which remaining work is skipped",
    )


def check_names(args: argparse.Namespace) -> None:
    for w in args.workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    for c in args.caps:
        if c not in CAPS:
            raise SystemExit(f"unknown cap {c!r}; choose from {', '.join(CAPS)}")


def time_left(deadline: float | None) -> float:
    return float("inf") if deadline is None else deadline - time.time()


def label(workload: str, cap: str) -> str:
    return f"{workload}@{cap}"


def unavailable(workload: str, cap: str, deadline: float | None, need_s: float) -> str | None:
    """Why a setting is skipped (a missing package, the time budget), or None to run it."""
    why = missing(workload)
    if why is not None:
        return why
    return "time budget spent" if time_left(deadline) < need_s else None


def skipped(workload: str, cap: str, reason: str) -> dict[str, Any]:
    """The record of a setting that did not run, with the reason."""
    return {
        "workload": workload,
        "cap": cap,
        "label": label(workload, cap),
        "status": "skipped",
        "reason": reason,
    }


# --------------------------------------------------------------------------- workers


def emit(result: dict[str, Any]) -> None:
    """A worker's answer: one marked JSON line on stdout."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


@dataclass(frozen=True)
class WorkerOutcome:
    rc: int | None  #: None when it ran past its timeout
    result: dict[str, Any] | None
    seconds: float
    tail: str  #: the end of stderr, for error reports


def run_worker(module: str, args: Sequence[str], timeout: float) -> WorkerOutcome:
    """Run ``python -m module args`` in a fresh process; parse its marked JSON line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONWARNINGS", "ignore")
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=max(1.0, timeout),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return WorkerOutcome(None, None, time.perf_counter() - start, err[-2000:])
    seconds = time.perf_counter() - start
    result = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER) :])
            break
    return WorkerOutcome(proc.returncode, result, seconds, proc.stderr[-2000:])
