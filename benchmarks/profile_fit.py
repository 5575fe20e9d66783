"""Where ``fit``'s time goes beyond the hand-written loop: one run of each under cProfile,
the functions of ``autoaccum`` (and the hand loop's own) per optimizer step.

cProfile slows every Python call, so the figures are larger than unprofiled ones and
Python-heavy code looks heavier than it is; the unprofiled difference is bench_overhead's.
Read them for where the host time goes and how many calls a step makes.

    python -m benchmarks.profile_fit --tiny --workloads mlp            # CPU
    python -m benchmarks.profile_fit --workloads gpt2 --steps 20       # GPU
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
import warnings
from typing import Any

from benchmarks.bench_overhead import DTYPES, run_once
from benchmarks.common import (
    add_common_args,
    apply_cap,
    check_names,
    configure_threads,
    pick_device,
)
from benchmarks.tables import md_table
from benchmarks.workloads import get_workload

#: what is reported: autoaccum's own functions, and torch's that fit calls more than the loop
PATTERNS = ("autoaccum/", "zero_grad", "synchronize", "item", "tolist", "_local_scalar_dense")


def profile_run(kind: str, args: argparse.Namespace, name: str, cap: str) -> dict[str, Any]:
    """One run of ``kind`` (``fit`` or ``hand``) under cProfile: per-step rows, most first."""
    device = pick_device(args.tiny)
    wl = get_workload(name, args.tiny)
    run_once(kind, wl, cap, device, args)  # warm: first-call costs are not a step's
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    result = run_once(kind, wl, cap, device, args)
    profiler.disable()
    seconds = time.perf_counter() - start
    stats: Any = pstats.Stats(profiler).stats
    rows = []
    for (path, line, func), (_, calls, own, cumulative, _) in stats.items():
        where = f"{path}:{line}({func})"
        if any(p in where for p in PATTERNS):
            short = where.split("site-packages/")[-1].split("/autoaccum/", 1)[-1]
            rows.append((cumulative / args.steps, own / args.steps, calls / args.steps, short))
    rows.sort(reverse=True)
    return {"kind": kind, "seconds": seconds, "mean_step_s": result["mean_step_s"], "rows": rows}


def render(run: dict[str, Any], top: int) -> str:
    table = [
        [f"{cum * 1e3:.3f}", f"{own * 1e3:.3f}", f"{calls:.1f}", where]
        for cum, own, calls, where in run["rows"][:top]
    ]
    headers = ["cumulative ms/step", "own ms/step", "calls/step", "function"]
    return (
        f"**{run['kind']}**: {run['mean_step_s'] * 1e3:.2f} ms/step profiled\n\n"
        f"{md_table(headers, table)}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, caps="uncapped")
    p.set_defaults(workloads=["mlp"])
    p.add_argument("--micro-batch", type=int, default=None, help="default: per workload")
    p.add_argument("--accum-iter", type=int, default=4)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=40, help="rows shown per run")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    args = p.parse_args(argv)
    check_names(args)
    warnings.filterwarnings("ignore")
    configure_threads(args.tiny)
    for name in args.workloads:
        for cap in args.caps:
            apply_cap(cap, pick_device(args.tiny))
            print(f"### profile of fit and the hand loop — {name}@{cap}, {args.steps} steps\n")
            for kind in ("hand", "fit"):
                print(render(profile_run(kind, args, name, cap), args.top) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
