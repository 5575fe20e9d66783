"""bench_throughput: samples/s of the plan autoaccum picks, against a sweep of plans above
and below it, all measured with ``autoaccum.fit`` itself.

For each workload × cap: ``autoaccum.probe`` (upper = the target batch) gives the ceiling
and ``make_plan(target, ceiling)`` the *largest* plan (what ``fit`` trains with today).
The *chooser* (:func:`autoaccum.probing.choose.choose_fastest`) times one micro-step at
each of its candidate sizes and one optimizer step, and predicts the fastest plan. Then
every size of the sweep (:func:`benchmarks.sweep.sweep_sizes`: above the plan up to the
first size expected to fail, below it down to ⅛) trains ``fit(..., max_micro=size,
max_steps=warm-up + windows)``; whole windows after the warm-up are timed by CUDA events
at the optimizer steps (no sync inside a step). A size above the plan is first tried by
one hand-written window; one that runs out of memory is reported ``oom``, as is one where
``fit`` had to shrink the micro-batch. The target: the chosen plan's samples/s ≥ 99 % of
the best point of the sweep.

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
from autoaccum.probing.choose import candidate_sizes, choose_fastest, time_call, time_sizes
from benchmarks.common import (
    add_common_args,
    apply_cap,
    check_names,
    configure_threads,
    env_info,
    free,
    label,
    pick_device,
    skipped,
    sync,
    time_left,
    unavailable,
)
from benchmarks.loops import WindowClock, hand_window
from benchmarks.sweep import shares, sweep_sizes
from benchmarks.tables import write_outputs
from benchmarks.targets import THROUGHPUT_SHARE, Verdict, judge_at_least, overall
from benchmarks.throughput_render import render
from benchmarks.workloads import Workload, autocast_for, build, get_workload, slice_batch


def fits(wl: Workload, model: Any, optimizer: Any, device: torch.device, size: int) -> bool:
    """One hand-written window of 2 micro-batches at ``size``: False on out-of-memory."""
    ok = True
    try:
        stream = wl.stream(size, device, 0)
        window = [next(stream), next(stream)]
        hand_window(model, optimizer, wl.loss_fn, window, wl.precision(device), device)
        sync(device)
    except Exception as exc:
        if not is_oom(exc):
            raise
        ok = False
    # Recover outside the except block: its traceback would pin the failed step's tensors.
    stream = window = None  # type: ignore[assignment]
    optimizer.zero_grad(set_to_none=True)
    free(device)
    return ok


def fit_rate(
    wl: Workload,
    model: Any,
    optimizer: Any,
    device: torch.device,
    target: int,
    size: int,
    args: Any,
) -> dict[str, Any]:
    """Samples/s of ``fit(max_micro=size)`` over whole windows after the warm-up."""
    plan = make_plan(target, size, min_micro=wl.min_micro)
    steps = args.warmup + args.windows
    if wl.dataset is not None:  # variable length: fit re-batches the loader, padding per micro
        data: Any = wl.loader(target)
    else:  # one resident micro-batch, sliced to the plan's sizes (no window-sized copy)
        pool = wl.make_batch(plan.micro_batch, device, 1)
        data = [slice_batch(pool, 0, n) for _ in range(steps) for n in plan.micro_sizes]
    clock = WindowClock(optimizer, device)
    result = None
    try:
        result = autoaccum.fit(
            model,
            data,
            target_batch=target,
            loss_fn=wl.loss_fn,
            count_fn=wl.count_fn,
            optimizer=optimizer,
            max_steps=steps,
            precision=wl.precision(device),
            max_micro=size,
            device=device,
            progress=False,
            report=False,
        )
    except Exception as exc:  # an OOM fit could not recover from is this point's result
        if not is_oom(exc):
            raise
    finally:
        clock.close()
    row = {"micro_batch": size, "micro_sizes": list(plan.micro_sizes), "status": "ok"}
    if result is None:
        row["status"] = "oom (fit raised)"
        optimizer.zero_grad(set_to_none=True)
    elif result.oom_retries:
        row["status"] = f"oom (fit shrank it to {result.plan.micro_batch})"
    else:
        seconds = clock.total_seconds(args.warmup)
        row["samples_per_s"] = target * args.windows / seconds if seconds else None
    del data
    free(device)
    return row


def time_candidates(
    wl: Workload, model: Any, optimizer: Any, device: torch.device, sizes: tuple[int, ...]
) -> tuple[dict[int, float], float]:
    """Seconds of one micro-step at each size (gradients accumulating, as in a window) and
    of one optimizer step: what the chooser needs, measured as the probe will measure it."""
    pool = wl.make_batch(max(sizes), device, 2)
    precision = wl.precision(device)

    def micro_step(size: int) -> None:
        with autocast_for(precision, device):
            loss = wl.loss_fn(model, slice_batch(pool, 0, size))
        loss.backward()

    def wait() -> None:
        sync(device)

    micro = time_sizes(micro_step, sizes, warmup=1, repeats=3, sync=wait)
    step = time_call(optimizer.step, warmup=1, repeats=3, sync=wait)
    optimizer.zero_grad(set_to_none=True)
    return micro, step


def choose(
    wl: Workload, model: Any, optimizer: Any, device: torch.device, target: int, ceiling: int
) -> dict[str, Any]:
    """The chooser as the probe will run it: time the candidates, then the pure decision."""
    sizes = candidate_sizes(target, ceiling, wl.min_micro)
    micro, step = time_candidates(wl, model, optimizer, device, sizes)
    free(device)
    picked = choose_fastest(target, ceiling, micro, step_seconds=step, min_micro=wl.min_micro)
    return {"micro_seconds": micro, "step_seconds": step, **picked.to_dict()}


def measure(args: argparse.Namespace, name: str, cap: str, device: torch.device) -> dict[str, Any]:
    wl = get_workload(name, args.tiny)
    target = args.target_batch or wl.target_batch
    model = build(wl, cap, device)
    optimizer = wl.make_optimizer(model)
    found = autoaccum.probe(
        model,
        wl.probe_batch(device),
        loss_fn=wl.loss_fn,
        optimizer=optimizer,
        upper=min(wl.upper, target),
        precision=wl.precision(device),
        device=device,
    )
    plan = make_plan(target, found.max_micro, min_micro=wl.min_micro)
    chooser = choose(wl, model, optimizer, device, target, found.max_micro)
    chosen = chooser["plan"]["micro_batch"]
    timed = [r["micro_sizes"][0] for r in chooser["rates"]]
    sizes = sweep_sizes(
        target, plan.micro_batch, found.largest_pass, extra=[chosen, *timed], min_micro=wl.min_micro
    )
    rows = []
    for size in sizes:
        if time_left(args.deadline) < 5:
            rows.append({"micro_batch": size, "status": "skipped (time budget)"})
            continue
        if size > plan.micro_batch and not fits(wl, model, optimizer, device, size):
            rows.append({"micro_batch": size, "status": "oom"})
        else:
            rows.append(fit_rate(wl, model, optimizer, device, target, size, args))
        rows[-1]["above_plan"] = size > plan.micro_batch
        print(f"  {label(name, cap)} micro {size}: {rows[-1]}", file=sys.stderr)
    del model, optimizer
    free(device)
    measured = shares(rows, plan.micro_batch, chosen)
    share = measured["chosen_share"]
    verdict = judge_at_least(share, THROUGHPUT_SHARE, "measured rate at the chosen plan")
    return {
        "workload": name,
        "cap": cap,
        "label": label(name, cap),
        "target_batch": target,
        "probe": {"largest_pass": found.largest_pass, "max_micro": found.max_micro},
        "plan": plan.to_dict(),
        "chooser": chooser,
        "sweep": rows,
        "tried_above_plan": [r["micro_batch"] for r in rows if r["above_plan"]],
        **measured,
        "targets": {"throughput": verdict.to_dict()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--target-batch", type=int, default=None, help="default: per workload")
    p.add_argument("--windows", type=int, default=None, help="timed windows (default 3; tiny 2)")
    p.add_argument("--warmup", type=int, default=1, help="windows not timed per size")
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
            why = unavailable(name, cap, args.deadline, 15)
            if why is not None:
                settings.append(skipped(name, cap, why))
                continue
            apply_cap(cap, device)
            settings.append(measure(args, name, cap, device))
    verdicts = [Verdict.from_dict(s["targets"]["throughput"]) for s in settings if "targets" in s]
    config = {k: getattr(args, k) for k in ("tiny", "workloads", "caps", "windows", "warmup")}
    data: dict[str, Any] = {
        "bench": "throughput",
        "env": env,
        "config": config,
        "workloads": settings,
        "targets": {"throughput": overall(verdicts).to_dict()},
        "seconds": time.perf_counter() - start,
    }
    markdown = render(data)
    print(markdown)
    path = write_outputs(args.out, "bench_throughput", data, markdown)
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
