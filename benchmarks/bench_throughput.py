"""bench_throughput: samples/s at autoaccum's plan against the best of a sweep of sizes.

For each workload × cap: ``autoaccum.probe`` finds the largest micro-batch, and
``make_plan(target_batch, probe.max_micro)`` plans the accumulation. Then samples/s is
measured with the hand-written loop for full optimizer steps of ``target_batch``
samples at each size of a sweep: the top ``--sweep`` powers of two up to the probe's
maximum, and the plan's micro-batch. The figure to look at is the plan's samples/s as
a share of the sweep's best: the largest micro-batch is not always the fastest.

    python -m benchmarks.bench_throughput          # GPU
    python -m benchmarks.bench_throughput --tiny   # CPU smoke mode
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Any

import torch

import autoaccum
from autoaccum import is_oom, make_plan
from benchmarks.common import (
    add_common_args,
    apply_cap,
    check_names,
    configure_threads,
    env_info,
    env_line,
    free,
    label,
    md_table,
    mode_note,
    pick_device,
    sync,
    time_left,
    write_outputs,
)
from benchmarks.loops import hand_window
from benchmarks.workloads import Workload, build, get_workload, slice_batch

PROBE_SAMPLES = 8


def sweep_sizes(max_batch: int, plan_micro: int, count: int) -> list[int]:
    """The top ``count`` powers of two ≤ ``max_batch`` (≥ 2: BatchNorm), plus the plan's size."""
    powers = [2**k for k in range(1, max_batch.bit_length()) if 2**k <= max_batch][-count:]
    return sorted({*powers, plan_micro})


def samples_per_second(
    wl: Workload,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    target: int,
    size: int,
    windows: int,
) -> float | None:
    """Samples/s of full optimizer steps of ``target`` samples at micro-batch ``size``;
    None when it runs out of memory."""
    plan = make_plan(target, size)
    batch = wl.make_batch(plan.micro_sizes[0], device, 1)
    micro_batches = [slice_batch(batch, 0, n) for n in plan.micro_sizes]
    precision = wl.precision(device)
    elapsed: float | None = None
    try:
        hand_window(model, optimizer, wl.loss_fn, micro_batches, precision, device)  # warm-up
        sync(device)
        start = time.perf_counter()
        for _ in range(windows):
            hand_window(model, optimizer, wl.loss_fn, micro_batches, precision, device)
        sync(device)
        elapsed = time.perf_counter() - start
    except Exception as exc:
        if not is_oom(exc):
            raise
    # Recover outside the except block: its traceback would pin the failed step's tensors.
    del batch, micro_batches
    optimizer.zero_grad(set_to_none=True)
    free(device)
    return None if elapsed is None else target * windows / elapsed


def measure(args: argparse.Namespace, name: str, cap: str, device: torch.device) -> dict[str, Any]:
    wl = get_workload(name, args.tiny)
    target = args.target_batch or wl.target_batch
    model = build(wl, cap, device)
    optimizer = wl.make_optimizer(model)
    found = autoaccum.probe(
        model,
        wl.make_batch(PROBE_SAMPLES, device, 0),
        loss_fn=wl.loss_fn,
        optimizer=optimizer,
        upper=min(wl.upper, target),
        precision=wl.precision(device),
        device=device,
    )
    plan = make_plan(target, found.max_micro)
    rows = []
    for size in sweep_sizes(found.largest_pass, plan.micro_batch, args.sweep):
        if time_left(args.deadline) < 5:
            rows.append(
                {"micro_batch": size, "samples_per_s": None, "status": "skipped (time budget)"}
            )
            continue
        sps = samples_per_second(wl, model, optimizer, device, target, size, args.windows)
        accum = make_plan(target, size).accum_iter
        rows.append(
            {
                "micro_batch": size,
                "accum_iter": accum,
                "samples_per_s": sps,
                "status": "ok" if sps is not None else "oom",
                "is_plan": size == plan.micro_batch,
            }
        )
        print(f"  {label(name, cap)} micro {size}: {sps}", file=sys.stderr)
    del model, optimizer
    free(device)
    measured = [r for r in rows if r["samples_per_s"] is not None]
    best = max(measured, key=lambda r: r["samples_per_s"], default=None)
    at_plan = next((r["samples_per_s"] for r in rows if r.get("is_plan")), None)
    return {
        "workload": name,
        "cap": cap,
        "label": label(name, cap),
        "target_batch": target,
        "probe": {
            "max_batch": found.largest_pass,
            "micro_batch": found.max_micro,
            "seconds": found.seconds,
        },
        "plan": plan.to_dict(),
        "sweep": rows,
        "plan_samples_per_s": at_plan,
        "best": best,
        "plan_share_of_best": at_plan / best["samples_per_s"] if at_plan and best else None,
    }


def render(data: dict[str, Any]) -> str:
    rows = []
    for s in data["workloads"]:
        if s.get("status") == "skipped":
            rows.append([s["label"], f"skipped: {s['reason']}", "", "", "", ""])
            continue
        best, share, plan = s["best"], s["plan_share_of_best"], s["plan"]
        rows.append(
            [
                s["label"],
                s["target_batch"],
                f"{plan['micro_batch']} × {plan['accum_iter']} (max {s['probe']['max_batch']})",
                s["plan_samples_per_s"],
                "–" if best is None else f"{best['samples_per_s']:.1f} at {best['micro_batch']}",
                "–" if share is None else f"{share:.0%}",
            ]
        )
    table = md_table(
        [
            "workload",
            "target batch",
            "autoaccum plan",
            "plan samples/s",
            "best samples/s",
            "plan / best",
        ],
        rows,
    )
    sweep_rows = []
    for s in data["workloads"]:
        for r in s.get("sweep", []):
            sweep_rows.append(
                [
                    s["label"],
                    r["micro_batch"],
                    r.get("accum_iter"),
                    r["samples_per_s"],
                    r["status"],
                    r.get("is_plan"),
                ]
            )
    sweep = md_table(
        ["workload", "micro-batch", "accum_iter", "samples/s", "status", "plan"], sweep_rows
    )
    return (
        f"### bench_throughput — {env_line(data['env'])}\n\n{mode_note(data['config']['tiny'])}\n\n"
        f"{table}\n\nSweep:\n\n{sweep}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--target-batch", type=int, default=None, help="default: per workload")
    p.add_argument("--sweep", type=int, default=4, help="how many powers of two to sweep")
    p.add_argument(
        "--windows", type=int, default=None, help="timed steps per size (default 3; tiny 2)"
    )
    args = p.parse_args(argv)
    check_names(args)
    args.windows = args.windows or (2 if args.tiny else 3)
    warnings.filterwarnings("ignore")
    configure_threads(args.tiny)
    device = pick_device(args.tiny)
    env = env_info(device)
    start = time.perf_counter()
    settings = []
    for name in args.workloads:
        for cap in args.caps:
            if time_left(args.deadline) < 15:
                settings.append(
                    {"label": label(name, cap), "status": "skipped", "reason": "time budget spent"}
                )
                continue
            apply_cap(cap, device)
            settings.append(measure(args, name, cap, device))
    data: dict[str, Any] = {
        "bench": "throughput",
        "env": env,
        "config": {
            "tiny": args.tiny,
            "workloads": args.workloads,
            "caps": args.caps,
            "sweep": args.sweep,
            "windows": args.windows,
        },
        "workloads": settings,
        "seconds": time.perf_counter() - start,
    }
    markdown = render(data)
    print(markdown)
    path = write_outputs(args.out, "bench_throughput", data, markdown)
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
