"""What deferred gradient sync costs against DDP's overlapped reduction.

``fit(sync="deferred")`` (the default for DDP) runs every micro-step of a window without
gradient sync and, once every rank has said its micro-steps succeeded, averages the
gradients in one all-reduce: an out-of-memory error on any rank is then recoverable
everywhere, but the reduction no longer overlaps the last backward. ``sync="overlap"`` is
DDP's own bucketed reduction inside the last micro-step's backward. This benchmark runs the
same windows both ways on ``--world`` processes and reports seconds per window and the
ratio. On the CPU it uses gloo (a smoke figure, not a GPU measurement); on a GPU machine
NCCL, one GPU per process.

    python -m benchmarks.bench_sync --world 2 --steps 20 --out benchmarks/out/sync.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoaccum


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10)
    )


def _run(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    cuda = torch.cuda.is_available()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    n = args.target * (args.steps + 1)
    data = TensorDataset(torch.randn(n, args.width), torch.randint(0, 10, (n,)))
    results = {}
    for sync in ("overlap", "deferred", "overlap", "deferred"):  # twice each, interleaved
        model = _model(args.width)
        start = time.perf_counter()
        result = autoaccum.fit(
            model,
            DataLoader(data, batch_size=args.target),
            args.target * world,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            max_micro=args.target // args.accum,
            max_steps=args.steps,
            device=device,
            sync=sync,
            progress=False,
            report=False,
        )
        seconds = (time.perf_counter() - start) / result.optimizer_steps
        results.setdefault(sync, []).append(seconds)
    if rank == 0:
        best = {k: min(v) for k, v in results.items()}
        out.put(
            {
                "device": torch.cuda.get_device_name(0) if cuda else "cpu (gloo)",
                "torch": torch.__version__,
                "world": world,
                "params": sum(p.numel() for p in _model(args.width).parameters()),
                "accum_iter": args.accum,
                "seconds_per_window": best,
                "deferred_over_overlap": best["deferred"] / best["overlap"],
            }
        )
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--width", type=int, default=1024, help="hidden width of the MLP")
    parser.add_argument("--target", type=int, default=64, help="samples per rank per window")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per window")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    queue: Any = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_run, args=(args.world, _free_port(), args, queue), nprocs=args.world, join=True)
    record = queue.get()
    text = json.dumps(record, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
