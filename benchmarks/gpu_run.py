"""The GPU figures of issue 21 in one call of at most nine minutes, everything under ``--out``.

Five parts, in this order, each a process of its own with its own deadline: the parts'
slots add up to ``--budget-s`` and each part must end by the end of its slot (time a part
leaves unused goes to the next), so a slow part is stopped, with everything it started,
and cannot eat the rest. A benchmark is told its deadline and skips what it cannot finish
("time budget spent", its targets *not established*).

1. ``1-gpu-tests``: ``pytest -m gpu -n 0`` (junit.xml, log.txt).
2. ``2-probe-default``, ``2-probe-expandable``: GPT-2 @ 24 GiB, the probe in-process and the
   stable maximum of fresh runs bracketed exactly, with the allocator as the environment
   has it, then with expandable segments added to it (a setting of the user's own is
   kept); ``2-allocator.md`` puts the largest in-process pass beside the fresh maximum.
   The default run is also part 3's GPT-2: with Lightning's binsearch and 200 fresh steps
   at autoaccum's choice.
3. ``3-probe-hf-gpt2``: the same for HF GPT-2 @ 24 GiB, against Lightning's binsearch.
4. ``4-throughput``: GPT-2 @ 24 GiB, the sweep above and below the plan with ``fit``, the
   fastest-plan chooser against the best of the sweep.
5. ``5-overhead``: ``fit`` against the hand-written loop (CUDA events, same weights).

Then ``targets.md`` (every target's verdict, :mod:`benchmarks.summary`) and
``gpu_run.json`` (the card, and each part's command, exit code, seconds and slot). Fresh runs train
``--fresh-steps`` (20) steps of 2 micro-batches, fewer than bench_probe's 50, to fit.

    python benchmarks/gpu_run.py --out "$OUT"          # on the GPU, ≤ 540 s
    python benchmarks/gpu_run.py --tiny --out /tmp/g   # CPU smoke run (fault-injected OOM)
    python benchmarks/gpu_run.py --only 5-overhead --budget-s 60 --out "$OUT"   # one part

Only the standard library here: the parts import torch, this process never touches the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ALLOC_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch's new name, the old
BUDGET_S = 525.0  #: default: under the 540 s of a device call, with time to write the summary
STOP_EARLY_S = 8.0  #: a benchmark's own deadline comes this long before its slot ends


@dataclass(frozen=True)
class Part:
    key: str  #: its folder under --out
    share: float  #: its slot, as a share of the budget
    argv: list[str]  #: after ``python -m``
    env: dict[str, str] = field(default_factory=dict)
    deadline_flag: bool = True  #: it takes --deadline (the benchmarks do, pytest does not)


def expandable(environ: dict[str, str]) -> dict[str, str]:
    """The allocator variable with expandable segments added to the user's own settings
    (kept as they are, an expandable_segments of their own included)."""
    name = next((n for n in ALLOC_VARS if environ.get(n)), "PYTORCH_CUDA_ALLOC_CONF")
    settings = [s.strip() for s in environ.get(name, "").split(",") if s.strip()]
    if not any(s.split(":")[0].strip() == "expandable_segments" for s in settings):
        settings.append("expandable_segments:True")
    return {name: ",".join(settings)}


def parts(args: argparse.Namespace) -> list[Part]:
    """The five parts; in tiny mode each as small as still runs its code (a CPU smoke run)."""
    t = args.tiny
    tiny = ["--tiny"] if t else []
    probe = ["benchmarks.bench_probe", "--caps", "24GiB", "--fresh-steps", str(args.fresh_steps)]
    probe += tiny
    peers = "autoaccum" if t else "autoaccum,lightning-binsearch"

    def bounds(runs: int, choice: int) -> list[str]:
        """Fresh runs of the bracket at most, and steps at the choice (tiny: as few as run)."""
        return ["--max-fresh-runs", str(runs), "--choice-steps", str(choice)]

    gpu_tests = ["pytest", "-m", "gpu", "-n", "0", "-q", "-p", "no:cacheprovider"]
    throughput = ["benchmarks.bench_throughput", "--workloads", "gpt2", "--caps", "24GiB"]
    overhead = ["benchmarks.bench_overhead", "--workloads", "gpt2,mlp" if t else "gpt2"]
    # slots: shares of the budget, sized from the 2026-11-25 H100 process times (README)
    return [
        Part("1-gpu-tests", 0.12, gpu_tests + (["tests/test_gpu.py"] if t else []), {}, False),
        Part(
            "2-probe-default",
            0.32,
            [
                *probe,
                "--workloads",
                "gpt2",
                "--tools",
                peers,
                *bounds(2 if t else 6, 0 if t else 200),
            ],
        ),
        Part(
            "2-probe-expandable",
            0.13,
            [*probe, "--workloads", "gpt2", "--tools", "autoaccum", *bounds(0 if t else 3, 0)],
            env=expandable(dict(os.environ)),
        ),
        Part(
            "3-probe-hf-gpt2",
            0.23,
            [
                *probe,
                "--workloads",
                "hf-gpt2",
                "--tools",
                peers,
                *bounds(0 if t else 5, 0 if t else 200),
            ],
        ),
        Part("4-throughput", 0.14, [*throughput, *tiny, "--windows", "1" if t else "2"]),
        Part(
            "5-overhead",
            0.06,
            [*overhead, *tiny] + (["--steps", "4", "--warmup", "1", "--repeats", "1"] if t else []),
        ),
    ]


def run_part(part: Part, out: Path, slot_end: float) -> dict[str, Any]:
    """Run one part in its own session, stopped (with every process it started) at
    ``slot_end``; what it printed goes to ``log.txt`` in its folder."""
    folder = out / part.key
    folder.mkdir(parents=True, exist_ok=True)
    argv = [*part.argv]
    if argv[0] == "pytest":
        argv += ["--junitxml", str(folder / "junit.xml")]
    else:
        argv += ["--out", str(folder)]
    if part.deadline_flag:
        argv += ["--deadline", f"{slot_end - STOP_EARLY_S:.0f}"]
    env = dict(os.environ, **part.env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    record: dict[str, Any] = {"part": part.key, "argv": argv, "env": part.env}
    start = time.time()
    with (folder / "log.txt").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", *argv],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped together
        )
        try:
            record["rc"] = proc.wait(timeout=max(1.0, slot_end - time.time()))
            record["stopped"] = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            record["rc"], record["stopped"] = None, True
    record["seconds"] = round(time.time() - start, 1)
    print(f"== {part.key}: rc={record['rc']} in {record['seconds']} s", file=sys.stderr)
    return record


def card() -> str:
    """What nvidia-smi says about the GPUs (name, driver, memory), or why it could not."""
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no nvidia-smi: {exc}"
    return done.stdout.strip() or done.stderr.strip()


def allocator_table(out: Path) -> str:
    """The largest in-process pass and the fresh stable maximum, per allocator setting."""
    rows = []
    for key in ("2-probe-default", "2-probe-expandable"):
        path = out / key / "bench_probe.json"
        if not path.exists():
            rows.append(f"| {key[8:]} | not run | | | |")
            continue
        setting = json.loads(path.read_text())["workloads"][0]
        aa = setting.get("tools", {}).get("autoaccum", {})
        bracket = setting.get("fresh", {}).get("bracket", {})
        rows.append(
            f"| {key[8:]} | {aa.get('max_batch', '–')} (first fail {aa.get('first_fail', '–')}) "
            f"| {bracket.get('largest_ok', '–')} | {bracket.get('smallest_fail', '–')} "
            f"| {aa.get('micro_batch', '–')} |"
        )
    return (
        "### The probe in-process against fresh runs — GPT-2 @ 24 GiB\n\n"
        "| allocator | largest pass in-process | largest fresh run that trained | smallest "
        "that failed | autoaccum's choice |\n|---|---|---|---|---|\n" + "\n".join(rows)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-s", type=float, default=None, help=f"default {BUDGET_S:.0f}; tiny 300")
    p.add_argument("--fresh-steps", type=int, default=None, help="default 20; tiny 2")
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny, fault-injected")
    p.add_argument("--only", default=None, help="comma-separated part keys (e.g. 5-overhead)")
    args = p.parse_args(argv)
    args.budget_s = args.budget_s or (300.0 if args.tiny else BUDGET_S)
    args.fresh_steps = args.fresh_steps or (2 if args.tiny else 20)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    todo = parts(args)
    if args.only:
        keep = set(args.only.split(","))
        todo = [part for part in todo if part.key in keep]
    total = sum(part.share for part in todo)
    records, slot_end = [], start
    for part in todo:
        slot_end += args.budget_s * part.share / total
        records.append({**run_part(part, args.out, slot_end), "slot_end": round(slot_end - start)})
    dirs = [
        args.out / k for k in ("2-probe-default", "3-probe-hf-gpt2", "4-throughput", "5-overhead")
    ]
    found = [str(d) for d in dirs if any(d.glob("bench_*.json"))]
    if found:
        subprocess.run(
            [sys.executable, "-m", "benchmarks.summary", *found, "--out", str(args.out)],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            timeout=60,
            check=False,
        )
    (args.out / "2-allocator.md").write_text(allocator_table(args.out) + "\n")
    report = {
        "card": card(),
        "budget_s": args.budget_s,
        "seconds": round(time.time() - start, 1),
        "parts": records,
    }
    (args.out / "gpu_run.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu_run: {report['seconds']} s of {args.budget_s:.0f}; see {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
