"""bench_probe: the micro-batch each batch-size finder picks, how long it takes, the exactly
bracketed stable maximum, and whether autoaccum's pick survives a long fresh run.

For every workload × cap, each tool runs in its own fresh process
(``benchmarks.probe_worker``): autoaccum, Lightning (power, binsearch), Accelerate and
Composer; a peer that is not installed is reported as skipped. Then, in fresh processes
(``benchmarks.fresh_run``), the *stable maximum* (the largest micro-batch that trains
``--fresh-steps`` steps) is bracketed exactly by :func:`benchmarks.stable.bracket_stable`:
down through the candidates (every tool's choice and in-process maximum, Lightning's before
its margin, the first size autoaccum saw fail), *up past the top one* until a size fails,
then bisected until the largest that trains and the smallest that fails are one apart.
Last, autoaccum's choice trains ``--choice-steps`` steps (200) in a fresh process.

    python -m benchmarks.bench_probe               # GPU
    python -m benchmarks.bench_probe --tiny        # CPU smoke mode (fault-injected OOM)
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from benchmarks.common import (
    EXIT_OK,
    EXIT_OOM,
    add_common_args,
    check_names,
    env_info,
    label,
    peer_module,
    pick_device,
    run_worker,
    skipped,
    time_left,
    unavailable,
)
from benchmarks.probe_render import render
from benchmarks.probe_worker import TOOL_PEER, TOOLS
from benchmarks.stable import Stop, bracket_stable
from benchmarks.tables import write_outputs
from benchmarks.targets import (
    CHOICE_STEPS,
    MISS,
    PROBE_TIME_LIMIT,
    Verdict,
    judge_at_most,
    judge_fresh,
    judge_share,
    not_established,
    overall,
)
from benchmarks.workloads import get_workload

MIN_SECONDS = 5.0  #: don't start a process with less time left than this


def run_tools(args: argparse.Namespace, workload: str, cap: str) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for tool in args.tools:
        peer = TOOL_PEER[tool]
        if peer is not None and peer_module(peer) is None:
            results[tool] = {"status": "skipped", "reason": f"{peer} not installed"}
            continue
        left = time_left(args.deadline)
        if left < MIN_SECONDS:
            results[tool] = {"status": "skipped", "reason": "time budget spent"}
            continue
        cmd = ["--tool", tool, "--workload", workload, "--cap", cap]
        out = run_worker(
            "benchmarks.probe_worker", [*cmd, *tiny(args)], min(args.tool_timeout, left)
        )
        if out.result is not None:
            result = out.result
        elif out.rc is None:
            result = {"status": "error", "reason": f"timed out after {out.seconds:.0f} s"}
        else:
            result = {"status": "error", "reason": f"exit {out.rc}: {out.tail[-300:]}"}
        result["process_seconds"] = out.seconds
        results[tool] = result
        print(f"  {label(workload, cap)} {tool}: {_describe(result)}", file=sys.stderr)
    return results


def tiny(args: argparse.Namespace) -> list[str]:
    return ["--tiny"] if args.tiny else []


def _describe(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')} ({r.get('reason')})"
    return f"micro-batch {r['micro_batch']} in {r['seconds']:.1f} s, {r['trials']} trials"


def candidates(tools: dict[str, dict[str, Any]]) -> set[int]:
    """Where the bracket starts: every tool's choice and in-process maximum (Lightning's
    before its margin), and the first size autoaccum's search saw fail."""
    found: set[int] = set()
    for result in tools.values():
        if result.get("status") != "ok":
            continue
        for key in ("micro_batch", "max_batch", "first_fail"):
            if result.get(key):
                found.add(int(result[key]))
    return found


def fresh_run(
    args: argparse.Namespace, workload: str, cap: str, size: int, steps: int, runs: list[Any]
) -> bool:
    """One fresh process training ``steps`` steps at ``size``: True when it trained them,
    False on out-of-memory; :class:`Stop` when it could not say (budget, error, timeout)."""
    left = time_left(args.deadline)
    if left < MIN_SECONDS:
        raise Stop("time budget spent")
    cmd = ["--workload", workload, "--cap", cap, "--size", str(size), "--steps", str(steps)]
    cmd += ["--accum", str(args.fresh_accum), *tiny(args)]
    out = run_worker("benchmarks.fresh_run", cmd, min(args.fresh_timeout, left))
    record: dict[str, Any] = {"size": size, "steps": steps, "rc": out.rc}
    record["process_seconds"] = out.seconds
    if out.result is not None:
        keep = ("seconds", "peak_allocated", "steps_done", "error")
        record.update({k: out.result.get(k) for k in keep})
    runs.append(record)
    print(f"  {label(workload, cap)} fresh {size} × {steps} steps: rc={out.rc}", file=sys.stderr)
    if out.rc not in (EXIT_OK, EXIT_OOM):
        raise Stop(f"fresh run at {size} did not finish cleanly (rc={out.rc})")
    return out.rc == EXIT_OK


def stable_search(
    args: argparse.Namespace, workload: str, cap: str, tools: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Bracket the stable maximum with fresh processes, then run autoaccum's choice long."""
    runs: list[dict[str, Any]] = []
    bracket = bracket_stable(
        candidates(tools),
        lambda size: fresh_run(args, workload, cap, size, args.fresh_steps, runs),
        upper=get_workload(workload, args.tiny).upper,
        grow=args.grow,
        max_runs=args.max_fresh_runs,
    )
    choice: dict[str, Any] = {"steps": args.choice_steps, "ran": None}
    aa = tools.get("autoaccum", {})
    if aa.get("status") == "ok" and args.choice_steps > 0:  # 0: not run (gpu_run's short parts)
        size = int(aa["micro_batch"])
        choice["size"] = size
        known, _ = bracket.survives(size)
        if known is False:  # it already failed a shorter run
            choice.update(ran=False, inferred=True)
        else:
            long_runs: list[dict[str, Any]] = []
            try:
                choice["ran"] = fresh_run(args, workload, cap, size, args.choice_steps, long_runs)
            except Stop as why:
                choice["stopped"] = str(why)
            choice["runs"] = long_runs
            if long_runs:
                choice["steps_done"] = long_runs[-1].get("steps_done")
    return {
        "steps": args.fresh_steps,
        "accum": args.fresh_accum,
        "candidates": sorted(candidates(tools)),
        "runs": runs,
        "bracket": bracket.to_dict(),
        "survives": {
            t: dict(zip(("ok", "how"), bracket.survives(int(r["micro_batch"])), strict=True))
            for t, r in tools.items()
            if r.get("status") == "ok" and r.get("micro_batch")
        },
        "choice": choice,
    }


def targets_for(tools: dict[str, dict[str, Any]], fresh: dict[str, Any]) -> dict[str, Any]:
    aa = tools.get("autoaccum", {})
    if aa.get("status") != "ok":
        why = not_established(f"autoaccum did not run: {aa.get('reason', aa.get('status'))}")
        return {k: why.to_dict() for k in ("choice_share", "choice_fresh", "probe_time")}
    b = fresh["bracket"]
    share = judge_share(int(aa["micro_batch"]), b["largest_ok"], b["smallest_fail"])
    choice = fresh["choice"]
    long = judge_fresh(choice["steps"], choice["ran"], choice.get("steps_done"))
    if choice.get("inferred"):
        long = Verdict(MISS, "out of memory (inferred: it failed a shorter fresh run)")
    lb = tools.get("lightning-binsearch", {})
    ratio = aa["seconds"] / lb["seconds"] if lb.get("status") == "ok" and lb["seconds"] else None
    why = f"Lightning binsearch result ({lb.get('status', 'not run')}: {lb.get('reason', '')})"
    speed = judge_at_most(ratio, PROBE_TIME_LIMIT, why)
    return {
        "choice_share": share.to_dict(),
        "choice_fresh": long.to_dict(),
        "probe_time": speed.to_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--tools", type=lambda v: v.split(","), default=list(TOOLS))
    p.add_argument("--fresh-steps", type=int, default=50, help="steps a size must train (N)")
    p.add_argument("--fresh-accum", type=int, default=2, help="micro-batches per fresh step")
    p.add_argument(
        "--choice-steps", type=int, default=CHOICE_STEPS, help="steps at the choice (0: none)"
    )
    p.add_argument("--max-fresh-runs", type=int, default=16, help="bracket runs per setting")
    p.add_argument("--grow", type=float, default=0.02, help="first step up past the top, ×size")
    p.add_argument("--tool-timeout", type=float, default=300.0, help="seconds per tool process")
    p.add_argument("--fresh-timeout", type=float, default=420.0, help="seconds per fresh run")
    args = p.parse_args(argv)
    check_names(args)
    for tool in args.tools:
        if tool not in TOOLS:
            raise SystemExit(f"unknown tool {tool!r}; choose from {', '.join(TOOLS)}")
    if "autoaccum" not in args.tools:
        raise SystemExit("--tools must include autoaccum: the targets are about it")
    # This process only orchestrates: it never allocates on (nor initialises) the device.
    env = env_info(pick_device(args.tiny))
    start = time.perf_counter()
    settings = []
    for workload in args.workloads:
        for cap in args.caps:
            why = unavailable(workload, cap, args.deadline, MIN_SECONDS)
            if why is not None:
                settings.append(skipped(workload, cap, why))
                continue
            tools = run_tools(args, workload, cap)
            fresh = stable_search(args, workload, cap, tools)
            settings.append(
                {
                    "workload": workload,
                    "cap": cap,
                    "label": label(workload, cap),
                    "tools": tools,
                    "fresh": fresh,
                    "targets": targets_for(tools, fresh),
                }
            )
    config = {k: getattr(args, k) for k in ("tiny", "workloads", "caps", "tools", "fresh_steps")}
    config.update(
        fresh_accum=args.fresh_accum,
        choice_steps=args.choice_steps,
        max_fresh_runs=args.max_fresh_runs,
        grow=args.grow,
    )
    data: dict[str, Any] = {
        "bench": "probe",
        "env": env,
        "config": config,
        "workloads": settings,
        "seconds": time.perf_counter() - start,
    }
    data["targets"] = {
        key: overall(
            Verdict.from_dict(s["targets"][key]) for s in settings if "targets" in s
        ).to_dict()
        for key in ("choice_share", "choice_fresh", "probe_time")
    }
    markdown = render(data)
    print(markdown)
    path = write_outputs(args.out, "bench_probe", data, markdown)
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
