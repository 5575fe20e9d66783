"""bench_overhead: what ``autoaccum.fit`` costs over a hand-written accumulation loop.

Both train the same model (same seed) on the same data, pre-generated on the device
as full windows of ``micro_batch × accum_iter`` samples, at the same micro-batch and
accum_iter: fit gets ``max_micro`` (so no probe runs), ``progress=False, report=False``;
the hand loop slices each window into micro-batches, runs forward under autocast,
``loss / accum_iter``, backward, then ``step()`` and ``zero_grad(set_to_none=True)``.
Both are timed by the same optimizer step post-hook (CUDA-synchronised; wall-clock on
CPU); the figure is the median step time after warm-up, best of ``--repeats`` runs
taken alternately. Peak memory is torch's allocator peak (CUDA only).

    python -m benchmarks.bench_overhead            # GPU
    python -m benchmarks.bench_overhead --tiny     # CPU smoke mode
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Any

import torch

import autoaccum
from benchmarks.common import (
    add_common_args,
    apply_cap,
    check_names,
    configure_threads,
    env_info,
    env_line,
    free,
    gib,
    label,
    md_table,
    median,
    mode_note,
    peak_bytes,
    pick_device,
    reset_peak,
    time_left,
    verdict,
    write_outputs,
)
from benchmarks.loops import StepClock, hand_window
from benchmarks.workloads import Workload, build, get_workload, slice_batch

OVERHEAD_LIMIT = 1.02  #: fit's step time must stay within 2% of the hand loop's


def run_once(
    kind: str,
    wl: Workload,
    cap: str,
    device: torch.device,
    micro: int,
    accum_iter: int,
    steps: int,
    warmup: int,
) -> dict[str, Any]:
    model = build(wl, cap, device)
    optimizer = wl.make_optimizer(model)
    target = micro * accum_iter
    windows = [wl.make_batch(target, device, seed) for seed in (1, 2)]
    precision = wl.precision(device)
    free(device)
    reset_peak(device)
    clock = StepClock(optimizer, device)
    try:
        if kind == "hand":
            for step in range(steps):
                window = windows[step % 2]
                micro_batches = [
                    slice_batch(window, j * micro, (j + 1) * micro) for j in range(accum_iter)
                ]
                hand_window(model, optimizer, wl.loss_fn, micro_batches, precision, device)
        else:
            autoaccum.fit(
                model,
                [windows[step % 2] for step in range(steps)],
                target_batch=target,
                loss_fn=wl.loss_fn,
                optimizer=optimizer,
                max_steps=steps,
                precision=precision,
                max_micro=micro,
                device=device,
                progress=False,
                report=False,
            )
    finally:
        clock.close()
    peak = peak_bytes(device)
    durations = clock.step_seconds(warmup)
    del model, optimizer, windows
    free(device)
    return {"median_step_s": median(durations), "step_s": durations, "peak_allocated": peak}


def measure(args: argparse.Namespace, name: str, cap: str, device: torch.device) -> dict[str, Any]:
    wl = get_workload(name, args.tiny)
    micro = args.micro_batch or wl.overhead_micro
    runs: dict[str, list[dict[str, Any]]] = {"hand": [], "fit": []}
    for _ in range(args.repeats):
        for kind in ("hand", "fit"):
            runs[kind].append(
                run_once(kind, wl, cap, device, micro, args.accum_iter, args.steps, args.warmup)
            )
    best = {k: min(r["median_step_s"] for r in v) for k, v in runs.items()}
    peaks = {k: max((r["peak_allocated"] or 0) for r in v) or None for k, v in runs.items()}
    ratio = best["fit"] / best["hand"]
    mem_ratio = peaks["fit"] / peaks["hand"] if peaks["fit"] and peaks["hand"] else None
    return {
        "workload": name,
        "cap": cap,
        "label": label(name, cap),
        "micro_batch": micro,
        "accum_iter": args.accum_iter,
        "target_batch": micro * args.accum_iter,
        "hand": {"median_step_s": best["hand"], "peak_allocated": peaks["hand"]},
        "fit": {"median_step_s": best["fit"], "peak_allocated": peaks["fit"]},
        "runs": runs,
        "time_ratio": ratio,
        "peak_ratio": mem_ratio,
        "targets": {"fit_le_102pct_hand": verdict(ratio <= OVERHEAD_LIMIT)},
    }


def render(data: dict[str, Any]) -> str:
    rows = []
    for s in data["workloads"]:
        if s.get("status") == "skipped":
            rows.append([s["label"], f"skipped: {s['reason']}", "", "", "", "", "", ""])
            continue
        rows.append(
            [
                s["label"],
                f"{s['micro_batch']} × {s['accum_iter']}",
                f"{s['hand']['median_step_s'] * 1e3:.1f}",
                f"{s['fit']['median_step_s'] * 1e3:.1f}",
                f"{s['time_ratio']:.3f}",
                gib(s["hand"]["peak_allocated"]),
                gib(s["fit"]["peak_allocated"]),
                s["targets"]["fit_le_102pct_hand"],
            ]
        )
    table = md_table(
        [
            "workload",
            "micro × accum",
            "hand ms/step",
            "fit ms/step",
            "fit / hand",
            "hand peak",
            "fit peak",
            "≤ 1.02×",
        ],
        rows,
    )
    t = data["targets"]["fit_le_102pct_hand"]
    return (
        f"### bench_overhead — {env_line(data['env'])}\n\n{mode_note(data['config']['tiny'])} "
        f"Median step time over {data['config']['steps'] - data['config']['warmup']} steps after "
        f"{data['config']['warmup']} warm-up, best of {data['config']['repeats']}.\n\n{table}\n\n"
        f"Targets: fit_le_102pct_hand: {t['verdict']} ({t['passed']}/{t['judged']})"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, caps="uncapped")
    p.add_argument("--micro-batch", type=int, default=None, help="default: per workload")
    p.add_argument("--accum-iter", type=int, default=4)
    p.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (default 15; tiny 6)"
    )
    p.add_argument("--warmup", type=int, default=None, help="steps not timed (default 3; tiny 2)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    check_names(args)
    args.steps = args.steps or (6 if args.tiny else 15)
    args.warmup = args.warmup or (2 if args.tiny else 3)
    if args.steps < args.warmup + 2:
        raise SystemExit("--steps must exceed --warmup by at least 2 to time anything")
    warnings.filterwarnings("ignore")  # fit's BatchNorm-with-accumulation note, peers' chatter
    configure_threads(args.tiny)
    device = pick_device(args.tiny)
    env = env_info(device)
    start = time.perf_counter()
    settings = []
    for name in args.workloads:
        for cap in args.caps:
            if time_left(args.deadline) < 10:
                settings.append(
                    {"label": label(name, cap), "status": "skipped", "reason": "time budget spent"}
                )
                continue
            apply_cap(cap, device)
            settings.append(measure(args, name, cap, device))
            print(
                f"  {label(name, cap)}: fit/hand {settings[-1]['time_ratio']:.3f}", file=sys.stderr
            )
    verdicts = [s["targets"]["fit_le_102pct_hand"] for s in settings if "targets" in s]
    passed = verdicts.count("PASS")
    data: dict[str, Any] = {
        "bench": "overhead",
        "env": env,
        "config": {
            "tiny": args.tiny,
            "workloads": args.workloads,
            "caps": args.caps,
            "accum_iter": args.accum_iter,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
        },
        "workloads": settings,
        "targets": {
            "fit_le_102pct_hand": {
                "verdict": "N/A"
                if not verdicts
                else ("PASS" if passed == len(verdicts) else "MISS"),
                "passed": passed,
                "judged": len(verdicts),
            }
        },
        "seconds": time.perf_counter() - start,
    }
    markdown = render(data)
    print(markdown)
    path = write_outputs(args.out, "bench_overhead", data, markdown)
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
