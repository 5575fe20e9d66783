"""bench_probe: the micro-batch each batch-size finder picks, how long it takes, and whether
the pick survives a long run started afresh.

For every workload × cap, each tool runs in its own fresh process
(``benchmarks.probe_worker``), so no tool profits from another's allocator cache or
autotuning: autoaccum (``autoaccum.probe``), Lightning ``Tuner.scale_batch_size``
(power and binsearch) and Accelerate ``find_executable_batch_size``; a peer that is not
installed is reported as skipped. Then the *stable maximum*, the largest micro-batch
that trains ``--fresh-steps`` steps in a fresh process (``benchmarks.fresh_run``), is
bisected, starting from the tools' choices and only between them (largest choice first,
then bisection between the largest that survives and the smallest that fails, at most
``--max-fresh-runs`` runs), which also says whether each tool's choice survives.

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
    env_line,
    label,
    md_table,
    mode_note,
    peer_module,
    pick_device,
    run_worker,
    time_left,
    verdict,
    write_outputs,
)
from benchmarks.probe_worker import TOOL_PEER, TOOLS

TOOL_NAMES = {
    "autoaccum": "autoaccum",
    "lightning-power": "Lightning (power)",
    "lightning-binsearch": "Lightning (binsearch)",
    "accelerate": "Accelerate",
}
CHOICE_FRACTION = 0.95  #: autoaccum's choice must reach this share of the stable maximum
PROBE_TIME_FRACTION = 0.5  #: autoaccum's probe must take at most this share of binsearch's
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
        cmd = [
            "--tool",
            tool,
            "--workload",
            workload,
            "--cap",
            cap,
            *(["--tiny"] if args.tiny else []),
        ]
        out = run_worker("benchmarks.probe_worker", cmd, min(args.tool_timeout, left))
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


def _describe(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')} ({r.get('reason')})"
    return f"micro-batch {r['micro_batch']} in {r['seconds']:.1f} s, {r['trials']} trials"


def stable_search(
    args: argparse.Namespace, workload: str, cap: str, tools: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Bisect the stable maximum with fresh processes, bounded by the tools' choices."""
    ok = {t: r for t, r in tools.items() if r.get("status") == "ok" and r.get("micro_batch")}
    choices = {t: int(r["micro_batch"]) for t, r in ok.items()}
    candidates = set(choices.values())
    aa = ok.get("autoaccum")
    if aa is not None:
        candidates.add(int(aa["max_batch"]))
        if aa.get("first_fail"):
            candidates.add(int(aa["first_fail"]))
    runs: list[dict[str, Any]] = []
    outcome: dict[int, bool] = {}
    stopped: str | None = None

    def fresh(size: int) -> bool | None:
        nonlocal stopped
        if len(runs) >= args.max_fresh_runs:
            stopped = f"--max-fresh-runs {args.max_fresh_runs} reached"
            return None
        left = time_left(args.deadline)
        if left < MIN_SECONDS:
            stopped = "time budget spent"
            return None
        cmd = [
            "--workload", workload, "--cap", cap, "--size", str(size),
            "--steps", str(args.fresh_steps), "--accum", str(args.fresh_accum),
            *(["--tiny"] if args.tiny else []),
        ]  # fmt: skip
        out = run_worker("benchmarks.fresh_run", cmd, min(args.fresh_timeout, left))
        record: dict[str, Any] = {"size": size, "rc": out.rc, "process_seconds": out.seconds}
        if out.result is not None:
            record.update({k: out.result.get(k) for k in ("seconds", "peak_allocated", "error")})
        runs.append(record)
        print(f"  {label(workload, cap)} fresh {size}: rc={out.rc}", file=sys.stderr)
        if out.rc not in (EXIT_OK, EXIT_OOM):
            stopped = f"fresh run at {size} did not finish cleanly (rc={out.rc})"
            return None
        outcome[size] = out.rc == EXIT_OK
        return outcome[size]

    lo, hi = 0, None  # lo: largest size known to survive (0: none); hi: smallest that fails
    for size in sorted(candidates, reverse=True):
        survived = fresh(size)
        if survived is None:
            break
        if survived:
            lo = size
            break
        hi = size
    while stopped is None and hi is not None and hi - lo > 1 and (lo > 0 or outcome):
        mid = (lo + hi) // 2
        survived = fresh(mid)
        if survived is None:
            break
        lo, hi = (mid, hi) if survived else (lo, mid)

    if not outcome:
        bound, stable, reference = "unknown", None, None
    elif hi is None:
        bound, stable, reference = "at_least", lo, lo
    elif hi - lo == 1:
        bound, stable, reference = "exact", lo, lo
    else:
        bound, stable, reference = "range", [lo, hi - 1], hi - 1

    def survives(c: int) -> tuple[bool | None, str]:
        if c in outcome:
            return outcome[c], "measured"
        if lo > 0 and c <= lo:
            return True, "inferred"
        if hi is not None and c >= hi:
            return False, "inferred"
        return None, "unknown"

    return {
        "steps": args.fresh_steps,
        "candidates": sorted(candidates),
        "runs": runs,
        "stable_max": stable,
        "bound": bound,
        "reference": reference,
        "stopped": stopped,
        "survives": {
            t: dict(zip(("ok", "how"), survives(c), strict=True)) for t, c in choices.items()
        },
    }


def targets_for(tools: dict[str, dict[str, Any]], fresh: dict[str, Any]) -> dict[str, Any]:
    aa = tools.get("autoaccum", {})
    aa_ok = aa.get("status") == "ok"
    ref = fresh.get("reference")
    share = aa["micro_batch"] / ref if aa_ok and ref else None
    survives = fresh["survives"].get("autoaccum", {}).get("ok") if aa_ok else False
    lb = tools.get("lightning-binsearch", {})
    speed = None
    if aa_ok and lb.get("status") == "ok" and lb.get("seconds"):
        speed = aa["seconds"] / lb["seconds"]
    return {
        "choice_share_of_stable": share,
        "choice_ge_95pct_stable": verdict(
            None if share is None and aa_ok else (share is not None and share >= CHOICE_FRACTION)
        ),
        "choice_survives_fresh": verdict(survives),
        "probe_time_vs_lightning_binsearch": speed,
        "probe_le_half_lightning_binsearch": verdict(
            None if speed is None else speed <= PROBE_TIME_FRACTION
        ),
    }


def overall(settings: list[dict[str, Any]], key: str) -> dict[str, Any]:
    verdicts = [s["targets"][key] for s in settings]
    passed = verdicts.count("PASS")
    judged = passed + verdicts.count("MISS")
    summary = "N/A" if judged == 0 else ("PASS" if passed == judged else "MISS")
    return {"verdict": summary, "passed": passed, "judged": judged}


def render(data: dict[str, Any]) -> str:
    n = data["config"]["fresh_steps"]
    accum = data["config"].get("fresh_accum", 1)
    n_desc = f"{n} steps × {accum} micro" if accum > 1 else f"{n} steps"
    rows: list[list[Any]] = []
    for s in data["workloads"]:
        for tool, r in s["tools"].items():
            name = TOOL_NAMES[tool]
            if r.get("status") != "ok":
                rows.append(
                    [s["label"], name, f"{r.get('status')}: {r.get('reason')}", "", "", "", ""]
                )
                continue
            surv = s["fresh"]["survives"].get(tool, {})
            ok = surv.get("ok")
            survived = "?" if ok is None else ("yes" if ok else "no")
            if surv.get("how") == "inferred":
                survived += " (inferred)"
            rows.append(
                [
                    s["label"],
                    name,
                    r["micro_batch"],
                    r.get("max_batch"),
                    r["seconds"],
                    r["trials"],
                    survived,
                ]
            )
    tools_table = md_table(
        [
            "workload",
            "tool",
            "micro-batch",
            "max in-process",
            "seconds",
            "trials",
            f"survives {n_desc} fresh",
        ],
        rows,
    )
    srows = []
    for s in data["workloads"]:
        f, t = s["fresh"], s["targets"]
        stable = f["stable_max"]
        if f["bound"] == "at_least":
            stable = f"≥ {stable}"
        elif f["bound"] == "range":
            stable = f"{stable[0]}–{stable[1]}"
        share = t["choice_share_of_stable"]
        speed = t["probe_time_vs_lightning_binsearch"]
        srows.append(
            [
                s["label"],
                stable,
                len(f["runs"]),
                "–" if share is None else f"{share:.0%} {t['choice_ge_95pct_stable']}",
                t["choice_survives_fresh"],
                "–" if speed is None else f"{speed:.2f}× {t['probe_le_half_lightning_binsearch']}",
            ]
        )
    stable_table = md_table(
        [
            "workload",
            f"stable max ({n_desc} fresh)",
            "fresh runs",
            "autoaccum / stable (≥95%)",
            "survives fresh",
            "probe time / Lightning binsearch (≤0.5×)",
        ],
        srows,
    )
    targets = " · ".join(
        f"{k}: {v['verdict']} ({v['passed']}/{v['judged']})" for k, v in data["targets"].items()
    )
    return (
        f"### bench_probe — {env_line(data['env'])}\n\n{mode_note(data['config']['tiny'])}\n\n"
        f"{tools_table}\n\n{stable_table}\n\nTargets: {targets}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--tools", type=lambda v: v.split(","), default=list(TOOLS))
    p.add_argument("--fresh-steps", type=int, default=50, help="steps a fresh run must survive")
    p.add_argument(
        "--fresh-accum",
        type=int,
        default=2,
        help="micro-batches per step in a fresh run (the size is used to accumulate)",
    )
    p.add_argument("--max-fresh-runs", type=int, default=8, help="fresh runs per workload, at most")
    p.add_argument("--tool-timeout", type=float, default=300.0, help="seconds per tool process")
    p.add_argument("--fresh-timeout", type=float, default=300.0, help="seconds per fresh run")
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
    data: dict[str, Any] = {
        "bench": "probe",
        "env": env,
        "config": {
            "tiny": args.tiny,
            "workloads": args.workloads,
            "caps": args.caps,
            "tools": args.tools,
            "fresh_steps": args.fresh_steps,
            "fresh_accum": args.fresh_accum,
            "max_fresh_runs": args.max_fresh_runs,
            "steps_per_trial_peers": 3,
        },
        "workloads": settings,
        "seconds": time.perf_counter() - start,
    }
    data["targets"] = {
        key: overall(settings, key)
        for key in (
            "choice_ge_95pct_stable",
            "choice_survives_fresh",
            "probe_le_half_lightning_binsearch",
        )
    }
    markdown = render(data)
    print(markdown)
    path = write_outputs(args.out, "bench_probe", data, markdown)
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
