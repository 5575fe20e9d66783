"""Worker: train ``--steps`` optimizer steps at micro-batch ``--size`` in this fresh process,
each step accumulating ``--accum`` micro-batches (default 2: how the size is used).

Fixed-shape workloads reuse one resident batch; variable-length ones read the shuffled
dataset, padded per micro-batch, so a long run meets the long batches a short one misses.

Exit status 0 when every step ran, 3 when it ran out of memory, 1 on any other error;
the marked JSON line on stdout says the same with timings and peak memory. Used by
bench_probe to find the *stable maximum*: the largest size that survives a long run
started afresh, free of the search's cached allocator state.

    python -m benchmarks.fresh_run --workload gpt2 --cap 24GiB --size 15 --steps 50
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from autoaccum import is_oom
from benchmarks.common import (
    EXIT_OK,
    EXIT_OOM,
    apply_cap,
    configure_threads,
    emit,
    peak_bytes,
    pick_device,
    reset_peak,
    sync,
)
from benchmarks.loops import hand_window
from benchmarks.workloads import CAPS, WORKLOADS, build, get_workload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=list(WORKLOADS), required=True)
    p.add_argument("--cap", choices=list(CAPS), required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--steps", type=int, default=50, help="optimizer steps it must train")
    p.add_argument(
        "--accum",
        type=int,
        default=2,
        help="micro-batches per optimizer step: the size is used to accumulate, so gradients "
        "are resident during every micro-batch after the first, as in the probe's trials",
    )
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)

    configure_threads(args.tiny)
    device = pick_device(args.tiny)
    apply_cap(args.cap, device)
    wl = get_workload(args.workload, args.tiny)
    result: dict[str, object] = {"size": args.size, "steps": args.steps, "accum": args.accum}
    done = 0
    start = time.perf_counter()
    failed: str | None = None
    try:
        model = build(wl, args.cap, device)
        optimizer = wl.make_optimizer(model)
        stream = wl.stream(args.size, device, 1)
        reset_peak(device)
        for _ in range(args.steps):
            window = [next(stream) for _ in range(args.accum)]
            hand_window(model, optimizer, wl.loss_fn, window, wl.precision(device), device)
            del window
            done += 1
        sync(device)
    except Exception as exc:
        failed = "oom" if is_oom(exc) else "error"
        result["error"] = traceback.format_exception_only(exc)[-1].strip()[:500]
    result["steps_done"] = done
    result["seconds"] = time.perf_counter() - start
    result["peak_allocated"] = peak_bytes(device)
    result["ok"] = failed is None
    result["failure"] = failed
    emit(result)
    if failed == "error":
        print(result["error"], file=sys.stderr)
        return 1
    return EXIT_OOM if failed == "oom" else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
