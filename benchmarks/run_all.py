"""Run every benchmark within a time budget and write all JSON plus one markdown summary.

Each benchmark runs as its own process with a deadline: bench_probe gets the first
``--probe-share`` of the budget (its fresh runs are the expensive part), then
bench_overhead and bench_throughput share the rest; work that would start after its
deadline is reported as skipped, never left half-done. Output, in ``--out``:
``bench_probe.json``, ``bench_overhead.json``, ``bench_throughput.json`` (and ``.md``
for each), ``summary.md`` (to paste into benchmarks/RESULTS.md; it ends with the verdict
on every target, :mod:`benchmarks.summary`) and ``summary.json``.

    bash benchmarks/run_all.sh                      # GPU
    bash benchmarks/run_all.sh --tiny               # CPU smoke mode
    python -m benchmarks.run_all --workloads gpt2 --caps 24GiB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_OUT, REPO, csv, env_info, env_line, pick_device
from benchmarks.summary import collect, render_summary
from benchmarks.tables import mode_note
from benchmarks.targets import CHOICE_STEPS

BENCHES = ("probe", "overhead", "throughput")
GRACE_S = 60.0  #: a benchmark may overrun its deadline by one unit of work; kill it after this


def run_bench(bench: str, args: list[str], deadline: float) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        f"benchmarks.bench_{bench}",
        *args,
        "--deadline",
        f"{deadline:.0f}",
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    print(f"== bench_{bench}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, timeout=max(5.0, deadline - time.time() + GRACE_S), check=False
        )
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        rc = None
    return {"bench": bench, "rc": rc, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode (fault-injected OOM)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--workloads", default="gpt2,resnet50,hf-gpt2,tv-resnet50,varlen-gpt2")
    p.add_argument(
        "--caps", default="24GiB,uncapped", help="caps for bench_probe and bench_throughput"
    )
    p.add_argument("--overhead-caps", default="uncapped", help="caps for bench_overhead")
    p.add_argument(
        "--overhead-workloads",
        default=None,
        help="workloads for bench_overhead (default: the fixed-shape ones of --workloads)",
    )
    p.add_argument(
        "--only",
        type=csv,
        default=list(BENCHES),
        help="comma-separated subset of " + ",".join(BENCHES),
    )
    p.add_argument(
        "--fresh-steps",
        type=int,
        default=None,
        help="steps a size must train in a fresh run (default 50; tiny 3)",
    )
    p.add_argument(
        "--choice-steps",
        type=int,
        default=None,
        help=f"steps autoaccum's choice must train fresh (default {CHOICE_STEPS}; tiny 6)",
    )
    p.add_argument(
        "--max-fresh-runs", type=int, default=16, help="fresh runs per setting in bench_probe"
    )
    p.add_argument("--tools", default=None, help="bench_probe tools (default: all)")
    p.add_argument("--budget-s", type=float, default=540.0, help="total wall-clock budget")
    p.add_argument(
        "--probe-share", type=float, default=0.65, help="share of the budget for bench_probe"
    )
    args = p.parse_args(argv)
    for bench in args.only:
        if bench not in BENCHES:
            raise SystemExit(f"unknown benchmark {bench!r}; choose from {', '.join(BENCHES)}")
    fresh_steps = args.fresh_steps or (3 if args.tiny else 50)
    choice_steps = args.choice_steps or (6 if args.tiny else CHOICE_STEPS)
    fixed = [w for w in csv(args.workloads) if w != "varlen-gpt2"]
    overhead_workloads = args.overhead_workloads or ",".join(fixed or csv(args.workloads))
    start = time.time()
    common = [
        "--out",
        str(args.out),
        "--workloads",
        args.workloads,
        *(["--tiny"] if args.tiny else []),
    ]
    probe_args = [*common, "--caps", args.caps, "--fresh-steps", str(fresh_steps)]
    probe_args += [
        "--choice-steps",
        str(choice_steps),
        "--max-fresh-runs",
        str(args.max_fresh_runs),
    ]
    probe_args += ["--tools", args.tools] if args.tools else []
    plans = {
        "probe": (probe_args, args.probe_share),
        "overhead": (
            [*common, "--caps", args.overhead_caps, "--workloads", overhead_workloads],
            (1 - args.probe_share) / 3,
        ),
        "throughput": ([*common, "--caps", args.caps], 2 * (1 - args.probe_share) / 3),
    }
    chosen = [b for b in BENCHES if b in args.only]
    weight = sum(plans[b][1] for b in chosen)
    runs, share = [], 0.0
    for bench in chosen:  # cumulative deadlines: time one benchmark leaves goes to the next
        (args.out / f"bench_{bench}.json").unlink(missing_ok=True)  # no stale result
        bench_args, part = plans[bench]
        share += part / weight
        runs.append(run_bench(bench, bench_args, start + share * args.budget_s))

    env = env_info(pick_device(args.tiny))
    sections = [
        f"## Benchmarks — {env_line(env)}",
        mode_note(args.tiny),
        "`"
        + " ".join(["python -m benchmarks.run_all", *(argv if argv is not None else sys.argv[1:])])
        + "`",
    ]
    for run in runs:
        md = args.out / f"bench_{run['bench']}.md"
        if run["rc"] == 0 and md.exists():
            sections.append(md.read_text().strip())
        else:
            status = "timed out" if run["rc"] is None else f"exit {run['rc']}"
            sections.append(f"### bench_{run['bench']} — did not finish ({status})")
    targets_md, targets = render_summary(collect([args.out]))
    sections.append(targets_md)
    summary = "\n\n".join(sections) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(summary)
    data = {"env": env, "runs": runs, **targets, "seconds": time.time() - start}
    (args.out / "summary.json").write_text(json.dumps(data, indent=2) + "\n")
    print("\n" + summary)
    print(f"wrote {args.out / 'summary.md'}", file=sys.stderr)
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
