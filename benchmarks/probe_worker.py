"""Worker: run one batch-size finder on one workload in this fresh process.

Tools: ``autoaccum`` (:func:`autoaccum.probe` on the workload's probe batch: 8 samples to
tile, or the first window of a variable-length dataset, as ``fit`` would), and the peers
of :mod:`benchmarks.peers`: ``lightning-power``, ``lightning-binsearch``, ``accelerate``,
``composer``. A tool whose package is not installed answers ``status: "skipped"``. The
answer is one marked JSON line on stdout: ``{tool, status, micro_batch, max_batch,
seconds, trials, sizes, ...}``, where ``max_batch`` is the largest size the tool trained
in-process before any margin; ``seconds`` is the search call alone (model already built).

    python -m benchmarks.probe_worker --tool autoaccum --workload gpt2 --cap 24GiB
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from typing import Any

import torch

import autoaccum
from benchmarks.common import (
    apply_cap,
    configure_threads,
    emit,
    peak_bytes,
    peer_module,
    pick_device,
    reset_peak,
    sync,
)
from benchmarks.peers import run_accelerate, run_composer, run_lightning
from benchmarks.workloads import CAPS, WORKLOADS, Workload, build, get_workload, missing

TOOLS = ("autoaccum", "lightning-power", "lightning-binsearch", "accelerate", "composer")
TOOL_PEER = {
    "autoaccum": None,
    "lightning-power": "lightning",
    "lightning-binsearch": "lightning",
    "accelerate": "accelerate",
    "composer": "composer",
}


def run_autoaccum(wl: Workload, cap: str, device: torch.device) -> dict[str, Any]:
    model = build(wl, cap, device)
    optimizer = wl.make_optimizer(model)
    batch = wl.probe_batch(device)
    sync(device)
    start = time.perf_counter()
    found = autoaccum.probe(
        model,
        batch,
        loss_fn=wl.loss_fn,
        optimizer=optimizer,
        upper=wl.upper,
        precision=wl.precision(device),
        device=device,
    )
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "micro_batch": found.max_micro,
        "max_batch": found.largest_pass,
        "seconds": seconds,
        "trials": len(found.trials),
        "sizes": [t.size for t in found.trials],
        "fits": [t.passed for t in found.trials],
        "first_fail": min((t.size for t in found.trials if not t.passed), default=None),
        # where the time and memory went, trial by trial (the search's own records)
        "trial_records": [t.to_dict() for t in found.trials],
        "trial_seconds": sum(t.seconds for t in found.trials),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tool", choices=TOOLS, required=True)
    p.add_argument("--workload", choices=list(WORKLOADS), required=True)
    p.add_argument("--cap", choices=list(CAPS), required=True)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")

    result: dict[str, Any] = {"tool": args.tool, "workload": args.workload, "cap": args.cap}
    peer = TOOL_PEER[args.tool]
    if peer is not None and peer_module(peer) is None:
        emit({**result, "status": "skipped", "reason": f"{peer} not installed"})
        return 0
    absent = missing(args.workload)
    if absent is not None:
        emit({**result, "status": "skipped", "reason": absent})
        return 0
    configure_threads(args.tiny)
    device = pick_device(args.tiny)
    apply_cap(args.cap, device)
    wl = get_workload(args.workload, args.tiny)
    reset_peak(device)
    try:
        if args.tool == "autoaccum":
            found = run_autoaccum(wl, args.cap, device)
        elif args.tool.startswith("lightning-"):
            found = run_lightning(wl, args.cap, device, args.tool.removeprefix("lightning-"))
        elif args.tool == "composer":
            found = run_composer(wl, args.cap, device)
        else:
            found = run_accelerate(wl, args.cap, device)
    except Exception as exc:
        emit(
            {
                **result,
                "status": "error",
                "reason": traceback.format_exception_only(exc)[-1].strip()[:500],
            }
        )
        traceback.print_exc()
        return 1
    emit({**result, "status": "ok", "peak_allocated": peak_bytes(device), **found})
    return 0


if __name__ == "__main__":
    sys.exit(main())
