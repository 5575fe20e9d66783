"""bench_sync: the deferred gradient reduction per parameter and in buckets, against DDP's
overlapped reduction, on ``--world`` ranks (gloo on the CPU, NCCL with one GPU per rank).

Two figures per model, each the median of runs taken in turn (A B C A B C …):

* **the reduction alone**: ``autoaccum.distributed.reduce_gradients`` on the model's
  gradients, one all-reduce per parameter (``bucket_bytes=0``, the path before buckets)
  against the ~25 MiB buckets (the default); the slowest rank's time of each call. With
  ``--variants``, also the other ways to hold the buckets: all packed at once, persistent
  buffers, gradients as views into the buckets (``sync_parts``).
* **a whole window**: ``autoaccum.fit`` with ``sync="deferred"`` reducing per parameter,
  with ``sync="deferred"`` in buckets, and with ``sync="overlap"`` (DDP's own bucketed
  reduction inside the last backward); seconds per optimizer step after ``--warmup``, from
  a step hook (:class:`benchmarks.loops.WindowClock`).

fit always reduces with the default buckets; for the per-parameter windows this script
swaps ``autoaccum.distributed.prepare_reduction`` for ``bucket_bytes=0`` while they run.

    python -m benchmarks.bench_sync --out benchmarks/out             # the three models
    python -m benchmarks.bench_sync --tiny --out /tmp/sync           # smoke run, seconds
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader

import autoaccum
from autoaccum import distributed as D
from autoaccum.buckets import all_reduce_mean
from benchmarks.common import DEFAULT_OUT, env_info
from benchmarks.loops import WindowClock
from benchmarks.sync_parts import MODELS, PersistentBuckets, build, dataset, reduce_into_views
from benchmarks.tables import md_table, write_outputs

WINDOWS = ("per_parameter", "bucketed", "overlap")
TIMEOUT_S = 30  #: a collective that waits longer than this fails the run instead of hanging


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=D.current().comm_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _per_parameter() -> Iterator[None]:
    """fit's deferred reduction with one all-reduce per parameter, while inside."""
    real = D.prepare_reduction
    D.prepare_reduction = functools.partial(real, bucket_bytes=0)  # type: ignore[assignment]
    try:
        yield
    finally:
        D.prepare_reduction = real  # type: ignore[assignment]


def time_reduction(
    model: nn.Module, device: torch.device, args: argparse.Namespace
) -> dict[str, list[float]]:
    """Each way of reducing, on the same gradients (this rank's own), in turn."""
    info = D.current()
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(10 + info.rank)
    local = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(device) for p in params]
    for p, g in zip(params, local, strict=True):
        p.grad = g.clone()
    ways: dict[str, Callable[[], None]] = {
        "per_parameter": lambda: D.reduce_gradients(model, info, bucket_bytes=0),
        "bucketed": lambda: D.reduce_gradients(model, info),
    }
    if args.variants:
        grads = [p.grad for p in params]
        every = len(params)
        ways["all_at_once"] = lambda: all_reduce_mean(grads, info.world_size, in_flight=every)
        persistent = PersistentBuckets(params)
        ways["persistent"] = lambda: persistent.reduce(params, info.world_size)
        ways["views"] = lambda: reduce_into_views(params, info.world_size)
    seconds: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(args.reduce_reps):
        for name, way in ways.items():
            for p, g in zip(params, local, strict=True):
                p.grad.copy_(g)  # type: ignore[union-attr]
            _sync(device)
            dist.barrier()
            start = time.perf_counter()
            way()
            _sync(device)
            seconds[name].append(_slowest(time.perf_counter() - start))
    return seconds


def time_windows(
    name: str, device: torch.device, args: argparse.Namespace
) -> dict[str, list[float]]:
    """Seconds per optimizer step of fit, each way in turn, ``--repeats`` runs of each."""
    world = dist.get_world_size()
    per_rank = args.micro * args.accum
    steps = args.warmup + args.steps
    data = dataset(name, per_rank * world * steps, args.tiny)
    seconds: dict[str, list[float]] = {k: [] for k in WINDOWS}
    for _ in range(args.repeats):
        for way in WINDOWS:
            model = build(name, args.tiny).to(device)
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
            clock = WindowClock(optimizer, device)
            slow = _per_parameter() if way == "per_parameter" else _nothing()
            with slow:
                autoaccum.fit(
                    model,
                    DataLoader(data, batch_size=per_rank),
                    per_rank * world,
                    optimizer=optimizer,
                    max_micro=args.micro,
                    max_steps=steps,
                    sync="overlap" if way == "overlap" else "deferred",
                    device=device,
                    progress=False,
                    report=False,
                )
            clock.close()
            seconds[way] += [_slowest(s) for s in clock.step_seconds(args.warmup)]
    return seconds


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        args.backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    torch.set_num_threads(args.threads)
    for name in args.models:
        model = build(name, args.tiny).to(device)
        params = list(model.parameters())
        record: dict[str, Any] = {
            "model": name,
            "tensors": len(params),
            "params": sum(p.numel() for p in params),
            "grad_bytes": sum(p.numel() * p.element_size() for p in params),
            "reduction_s": time_reduction(model, device, args),
            "window_s": time_windows(name, device, args),
        }
        if rank == 0:
            queue.put(record)
    dist.destroy_process_group()


def summarise(record: dict[str, Any]) -> dict[str, Any]:
    """Medians and the ratios the targets are about."""
    red = {k: statistics.median(v) for k, v in record["reduction_s"].items()}
    win = {k: statistics.median(v) for k, v in record["window_s"].items()}
    return {
        **record,
        "reduction_median_s": red,
        "window_median_s": win,
        "reduction_speedup": red["per_parameter"] / red["bucketed"],
        "window_bucketed_over_overlap": win["bucketed"] / win["overlap"],
        "window_bucketed_over_per_parameter": win["bucketed"] / win["per_parameter"],
    }


def render(data: dict[str, Any]) -> str:
    env, cfg = data["env"], data["config"]
    variants = [k for k in ("all_at_once", "persistent", "views") if cfg["variants"]]
    rows = []
    for m in data["models"]:
        red, win = m["reduction_median_s"], m["window_median_s"]
        rows.append(
            [
                m["model"],
                m["tensors"],
                f"{m['grad_bytes'] / 2**20:.1f} MiB",
                f"{red['per_parameter'] * 1e3:.1f}",
                f"{red['bucketed'] * 1e3:.1f}",
                *(f"{red[v] * 1e3:.1f}" for v in variants),
                f"{m['reduction_speedup']:.2f}×",
                f"{win['per_parameter'] * 1e3:.0f}",
                f"{win['bucketed'] * 1e3:.0f}",
                f"{win['overlap'] * 1e3:.0f}",
                f"{m['window_bucketed_over_overlap']:.3f}",
            ]
        )
    headers = ["model", "tensors", "gradients", "reduce per-param ms", "reduce bucketed ms"]
    headers += [f"reduce {v} ms" for v in variants]
    headers += ["speed-up", "window per-param ms", "window bucketed ms", "window overlap ms"]
    headers += ["bucketed / overlap"]
    load = ", ".join(f"{x:.1f}" for x in data["load_before"])
    return (
        f"### bench_sync — {cfg['world']} ranks ({data['backend']}), torch {env['torch']}, "
        f"{env['date']}, {cfg['threads']} thread(s) per rank, load average before {load}\n\n"
        f"Medians: the reduction over {cfg['reduce_reps']} calls of each way in turn (slowest "
        f"rank); a window over {cfg['steps']} steps after {cfg['warmup']} warm-up × "
        f"{cfg['repeats']} runs in turn, {cfg['micro']} × {cfg['accum']} per rank.\n\n"
        f"{md_table(headers, rows)}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument(
        "--backend",
        choices=["auto", "gloo", "nccl"],
        default="auto",
        help="auto: NCCL when there is a GPU per rank, else gloo",
    )
    p.add_argument("--models", default=",".join(MODELS), help=f"of {', '.join(MODELS)}")
    p.add_argument("--micro", type=int, default=2, help="micro-batch per rank")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per window")
    p.add_argument("--steps", type=int, default=4, help="timed windows per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs of each way, in turn")
    p.add_argument("--reduce-reps", type=int, default=9, help="reductions of each way")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--variants", action="store_true", help="other ways to hold the buckets")
    p.add_argument("--tiny", action="store_true", help="tiny models: a smoke run, not a figure")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    if unknown := [m for m in args.models if m not in MODELS]:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    if args.backend == "auto":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        args.backend = "nccl" if gpus >= args.world and not args.tiny else "gloo"
    load_before = os.getloadavg()
    start = time.perf_counter()
    queue: Any = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=(args.world, _free_port(), args, queue), nprocs=args.world, join=True)
    records = [summarise(queue.get()) for _ in args.models]
    keys = ("world", "micro", "accum", "steps", "warmup", "repeats", "reduce_reps", "threads")
    data: dict[str, Any] = {
        "bench": "sync",
        "env": env_info(torch.device("cuda" if args.backend == "nccl" else "cpu")),
        "backend": args.backend,
        "config": {**{k: getattr(args, k) for k in keys}, "variants": args.variants},
        "tiny": args.tiny,
        "models": records,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "seconds": time.perf_counter() - start,
    }
    markdown = render(data)
    print(markdown)
    path = write_outputs(args.out, "bench_sync", data, markdown)
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
