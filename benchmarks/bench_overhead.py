"""bench_overhead: what ``autoaccum.fit`` costs over a hand-written accumulation loop, and
whether the two land on the same weights.

Both train the same model (same seed, same RNG state) on the same micro-batches,
pre-generated on the device, at the same micro-batch × accum_iter: ``fit`` gets
``max_micro`` (no probe), ``progress=False, report=False``; the hand loop
(:func:`benchmarks.loops.hand_window`) runs forward under autocast, ``loss / accum_iter``,
backward, ``step()``, ``zero_grad(set_to_none=True)``. Timing never synchronises inside a
step: :class:`~benchmarks.loops.WindowClock` records a CUDA event at every optimizer step
and reads them after the run, so ``fit``'s own per-step sync (``float(loss)``) is paid
exactly as in training. The figure is the mean time per step over the steps after
warm-up (whole windows), the median of ``--repeats`` runs of each taken in turn. The
final weights of the first run of each are compared (max relative difference per tensor);
with ``--dtype float64`` on CPU they agree to rounding.

    python -m benchmarks.bench_overhead                      # GPU
    python -m benchmarks.bench_overhead --tiny               # CPU smoke mode
    python -m benchmarks.bench_overhead --tiny --dtype float64 --workloads gpt2
"""

from __future__ import annotations

import argparse
import statistics
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
    label,
    peak_bytes,
    pick_device,
    reset_peak,
    skipped,
    unavailable,
)
from benchmarks.loops import WindowClock, hand_window, max_rel_diff, weights
from benchmarks.tables import gib, md_table, mode_note, write_outputs
from benchmarks.targets import OVERHEAD_LIMIT, TARGETS, Verdict, judge_at_most, overall
from benchmarks.workloads import Batch, Workload, build, get_workload, slice_batch

FIXED_SHAPE = ("gpt2", "resnet50", "hf-gpt2", "tv-resnet50", "mlp")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _cast(batch: Batch, dtype: torch.dtype) -> Batch:
    """Floating tensors of ``batch`` in ``dtype`` (token ids and labels stay integers)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    return type(batch)(_cast(t, dtype) for t in batch)


def make_windows(
    wl: Workload, device: torch.device, micro: int, accum_iter: int, dtype: torch.dtype
) -> list[list[Batch]]:
    """Two windows of ``accum_iter`` micro-batches each, on the device, used alternately."""
    windows = []
    for seed in (1, 2):
        full = _cast(wl.make_batch(micro * accum_iter, device, seed), dtype)
        windows.append([slice_batch(full, j * micro, (j + 1) * micro) for j in range(accum_iter)])
    return windows


def run_once(
    kind: str,
    wl: Workload,
    cap: str,
    device: torch.device,
    args: argparse.Namespace,
    keep_weights: bool = False,
) -> dict[str, Any]:
    dtype = DTYPES[args.dtype]
    model = build(wl, cap, device).to(dtype)
    optimizer = wl.make_optimizer(model)
    micro = args.micro_batch or wl.overhead_micro
    windows = make_windows(wl, device, micro, args.accum_iter, dtype)
    precision = wl.precision(device)
    free(device)
    reset_peak(device)
    clock = WindowClock(optimizer, device)
    torch.manual_seed(1)  # the same dropout masks on both sides
    try:
        if kind == "hand":
            for step in range(args.steps):
                window = windows[step % 2]
                hand_window(model, optimizer, wl.loss_fn, window, precision, device, wl.count_fn)
        else:
            autoaccum.fit(
                model,
                [mb for step in range(args.steps) for mb in windows[step % 2]],
                target_batch=micro * args.accum_iter,
                loss_fn=wl.loss_fn,
                count_fn=wl.count_fn,
                optimizer=optimizer,
                max_steps=args.steps,
                precision=precision,
                max_micro=micro,
                device=device,
                progress=False,
                report=False,
            )
    finally:
        clock.close()
    steps = clock.step_seconds(args.warmup)
    cpu = clock.step_cpu_seconds(args.warmup)
    result = {
        "mean_step_s": sum(steps) / len(steps),
        "mean_step_cpu_s": sum(cpu) / len(cpu) if cpu else None,
        "step_s": steps,
        "peak_allocated": peak_bytes(device),
        "weights": weights(model) if keep_weights else None,
    }
    del model, optimizer, windows
    free(device)
    return result


def measure(args: argparse.Namespace, name: str, cap: str, device: torch.device) -> dict[str, Any]:
    wl = get_workload(name, args.tiny)
    runs: dict[str, list[dict[str, Any]]] = {"hand": [], "fit": []}
    for repeat in range(args.repeats):  # in turn, and each first every other time: ABBA…
        for kind in ("hand", "fit") if repeat % 2 == 0 else ("fit", "hand"):
            runs[kind].append(run_once(kind, wl, cap, device, args, keep_weights=repeat == 0))
    diff = max_rel_diff(runs["fit"][0].pop("weights"), runs["hand"][0].pop("weights"))
    for kind_runs in runs.values():
        for r in kind_runs:
            r.pop("weights", None)
    best = {k: statistics.median(r["mean_step_s"] for r in v) for k, v in runs.items()}
    cpu = {
        k: statistics.median(r["mean_step_cpu_s"] for r in v)
        for k, v in runs.items()
        if all(r["mean_step_cpu_s"] for r in v)
    }
    peaks = {k: max((r["peak_allocated"] or 0) for r in v) or None for k, v in runs.items()}
    ratio = best["fit"] / best["hand"]
    micro = args.micro_batch or wl.overhead_micro
    return {
        "workload": name,
        "cap": cap,
        "label": label(name, cap),
        "micro_batch": micro,
        "accum_iter": args.accum_iter,
        "target_batch": micro * args.accum_iter,
        "hand": {"mean_step_s": best["hand"], "peak_allocated": peaks["hand"]},
        "fit": {"mean_step_s": best["fit"], "peak_allocated": peaks["fit"]},
        "runs": runs,
        "time_ratio": ratio,
        "cpu_time_ratio": cpu["fit"] / cpu["hand"] if len(cpu) == 2 else None,
        "cpu_step_s": cpu or None,
        "weights_max_rel_diff": diff,
        "targets": {"overhead": judge_at_most(ratio, OVERHEAD_LIMIT, "timing").to_dict()},
    }


def _cpu_cell(s: dict[str, Any]) -> str:
    """fit / hand in CPU time per step (CPU runs): what a shared machine's load leaves out."""
    if not s.get("cpu_time_ratio"):
        return "–"
    cpu = s["cpu_step_s"]
    return f"{s['cpu_time_ratio']:.3f} ({cpu['fit'] * 1e3:.1f} / {cpu['hand'] * 1e3:.1f} ms)"


def render(data: dict[str, Any]) -> str:
    rows = []
    for s in data["workloads"]:
        if s.get("status") == "skipped":
            rows.append([s["label"], f"skipped: {s['reason']}", *[""] * 8])
            continue
        rows.append(
            [
                s["label"],
                f"{s['micro_batch']} × {s['accum_iter']}",
                f"{s['hand']['mean_step_s'] * 1e3:.1f}",
                f"{s['fit']['mean_step_s'] * 1e3:.1f}",
                f"{s['time_ratio']:.3f}",
                _cpu_cell(s),
                f"{s['weights_max_rel_diff']:.2e}",
                gib(s["hand"]["peak_allocated"]),
                gib(s["fit"]["peak_allocated"]),
                Verdict.from_dict(s["targets"]["overhead"]).cell(),
            ]
        )
    headers = ["workload", "micro × accum", "hand ms/step", "fit ms/step", "fit / hand"]
    headers += ["fit / hand, CPU time", "weights: max rel. diff", "hand peak", "fit peak"]
    headers += [TARGETS["overhead"]]
    cfg = data["config"]
    t = Verdict.from_dict(data["targets"]["overhead"])
    return (
        f"### bench_overhead — {env_line(data['env'])}\n\n{mode_note(cfg['tiny'])} "
        f"Mean time per step over {cfg['steps'] - cfg['warmup']} steps after {cfg['warmup']} "
        f"warm-up (CUDA events, no sync inside a step), median of {cfg['repeats']} runs "
        "of each in turn; on the CPU also the CPU time of the training thread per step "
        f"(one intra-op thread); {cfg['dtype']} parameters.\n\n{md_table(headers, rows)}\n\n"
        f"Targets: {TARGETS['overhead']}: {t.cell()}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, caps="uncapped")
    p.set_defaults(workloads=list(FIXED_SHAPE))
    p.add_argument("--micro-batch", type=int, default=None, help="default: per workload")
    p.add_argument("--accum-iter", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 20; tiny 6)")
    p.add_argument("--warmup", type=int, default=None, help="steps not timed (default 4; tiny 2)")
    p.add_argument("--repeats", type=int, default=None, help="runs of each (default 3; tiny 1)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="parameter dtype")
    args = p.parse_args(argv)
    check_names(args)
    args.steps = args.steps or (6 if args.tiny else 20)
    args.warmup = args.warmup or (2 if args.tiny else 4)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    if args.steps < args.warmup + 2:
        raise SystemExit("--steps must exceed --warmup by at least 2 to time anything")
    warnings.filterwarnings("ignore")  # fit's BatchNorm-with-accumulation note, peers' chatter
    configure_threads(args.tiny)
    device = pick_device(args.tiny)
    if args.dtype == "float64" and device.type == "cuda":
        raise SystemExit("--dtype float64 is the CPU exactness check; on a GPU use float32")
    env = env_info(device)
    start = time.perf_counter()
    settings = []
    for name in args.workloads:
        for cap in args.caps:
            why = unavailable(name, cap, args.deadline, 10)
            if why is not None:
                settings.append(skipped(name, cap, why))
                continue
            apply_cap(cap, device)
            settings.append(measure(args, name, cap, device))
            s = settings[-1]
            print(f"  {s['label']}: fit/hand {s['time_ratio']:.3f}", file=sys.stderr)
    config = {k: getattr(args, k) for k in ("tiny", "workloads", "caps", "accum_iter", "steps")}
    config.update(warmup=args.warmup, repeats=args.repeats, dtype=args.dtype)
    verdicts = [Verdict.from_dict(s["targets"]["overhead"]) for s in settings if "targets" in s]
    data: dict[str, Any] = {
        "bench": "overhead",
        "env": env,
        "config": config,
        "workloads": settings,
        "targets": {"overhead": overall(verdicts).to_dict()},
        "seconds": time.perf_counter() - start,
    }
    markdown = render(data)
    print(markdown)
    path = write_outputs(args.out, "bench_overhead", data, markdown)
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
