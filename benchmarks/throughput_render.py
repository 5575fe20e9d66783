"""bench_throughput's markdown: plan, chooser and best per setting, then every sweep point."""

from __future__ import annotations

from typing import Any

from autoaccum.probing.choose import describe_sizes
from benchmarks.common import env_line
from benchmarks.tables import md_table, mode_note
from benchmarks.targets import TARGETS, Verdict

__all__ = ["render"]


def _plan(sizes: list[int]) -> str:
    return describe_sizes(sizes)


def _share(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:.1f} %"


def _rate(rows: list[dict[str, Any]], size: int) -> str:
    for r in rows:
        if r["micro_batch"] == size:
            rate = r.get("samples_per_s")
            return r["status"] if rate is None else f"{rate:.1f}"
    return "not measured"


def summary_table(data: dict[str, Any]) -> str:
    rows = []
    for s in data["workloads"]:
        if s.get("status") == "skipped":
            rows.append([s["label"], f"skipped: {s['reason']}", "", "", "", "", ""])
            continue
        plan, chosen, best = s["plan"], s["chooser"]["plan"], s["best"]
        rows.append(
            [
                s["label"],
                f"{s['target_batch']} (ceiling {s['probe']['max_micro']})",
                f"{_plan(plan['micro_sizes'])}: {_rate(s['sweep'], plan['micro_batch'])} "
                f"({_share(s['plan_share'])})",
                f"{_plan(chosen['micro_sizes'])}: {_rate(s['sweep'], chosen['micro_batch'])} "
                f"({_share(s['chosen_share'])})",
                "–" if best is None else f"{best['samples_per_s']:.1f} at {best['micro_batch']}",
                ", ".join(str(x) for x in s["tried_above_plan"]) or "none (plan = whole target)",
                Verdict.from_dict(s["targets"]["throughput"]).cell(),
            ]
        )
    headers = ["workload", "target batch", "largest plan: samples/s (share of best)"]
    headers += ["chosen plan: samples/s (share)", "best of the sweep", "tried above the plan"]
    return md_table([*headers, TARGETS["throughput"]], rows)


def sweep_table(data: dict[str, Any]) -> str:
    rows = []
    for s in data["workloads"]:
        if s.get("status") == "skipped":
            continue
        plan, chosen = s["plan"]["micro_batch"], s["chooser"]["plan"]["micro_batch"]
        predicted = {r["micro_sizes"][0]: r["samples_per_s"] for r in s["chooser"]["rates"]}
        for r in s["sweep"]:
            size = r["micro_batch"]
            tags = [
                t for t, on in (("largest plan", size == plan), ("chosen", size == chosen)) if on
            ]
            tags += ["above plan"] if r.get("above_plan") else []
            rows.append(
                [
                    s["label"],
                    size,
                    _plan(r["micro_sizes"]) if r.get("micro_sizes") else "–",
                    r.get("samples_per_s"),
                    predicted.get(size),
                    r["status"],
                    ", ".join(tags),
                ]
            )
    headers = ["workload", "max_micro", "plan", "samples/s (fit)", "chooser's prediction"]
    return md_table([*headers, "status", ""], rows)


def render(data: dict[str, Any]) -> str:
    cfg = data["config"]
    reasons = "\n".join(
        f"- {s['label']}: {s['chooser']['reason']}" for s in data["workloads"] if "chooser" in s
    )
    t = Verdict.from_dict(data["targets"]["throughput"])
    return (
        f"### bench_throughput — {env_line(data['env'])}\n\n{mode_note(cfg['tiny'])} "
        f"Each point: `fit(max_micro=size)`, {cfg['windows']} windows timed after "
        f"{cfg['warmup']} warm-up.\n\n{summary_table(data)}\n\nThe chooser:\n\n{reasons}\n\n"
        f"Sweep:\n\n{sweep_table(data)}\n\nTargets: {TARGETS['throughput']}: {t.cell()}"
    )
