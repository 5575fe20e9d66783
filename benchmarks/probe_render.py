"""bench_probe's markdown: the tools side by side, then the bracket and the targets."""

from __future__ import annotations

from typing import Any

from benchmarks.common import env_line
from benchmarks.tables import md_table, mode_note
from benchmarks.targets import TARGETS, Verdict

__all__ = ["TOOL_NAMES", "render"]

TOOL_NAMES = {
    "autoaccum": "autoaccum",
    "lightning-power": "Lightning (power)",
    "lightning-binsearch": "Lightning (binsearch)",
    "accelerate": "Accelerate",
    "composer": "Composer (auto)",
}
PROBE_TARGETS = ("choice_share", "choice_fresh", "probe_time")


def _survived(s: dict[str, Any], tool: str) -> str:
    surv = s["fresh"]["survives"].get(tool, {})
    ok = surv.get("ok")
    text = "?" if ok is None else ("yes" if ok else "no")
    return text + (" (inferred)" if surv.get("how") == "inferred" else "")


def tools_table(data: dict[str, Any], n_desc: str) -> str:
    rows: list[list[Any]] = []
    for s in data["workloads"]:
        if s.get("status") == "skipped":
            rows.append([s["label"], "–", f"skipped: {s['reason']}", "", "", "", "", ""])
            continue
        for tool, r in s["tools"].items():
            name = TOOL_NAMES[tool]
            if r.get("status") != "ok":
                note = f"{r.get('status')}: {r.get('reason')}"
                rows.append([s["label"], name, note, "", "", "", "", ""])
                continue
            rows.append(
                [
                    s["label"],
                    name,
                    r["micro_batch"],
                    r.get("max_batch"),
                    r.get("first_fail"),
                    r["seconds"],
                    r["trials"],
                    _survived(s, tool),
                ]
            )
    headers = ["workload", "tool", "micro-batch", "max in-process", "first fail in-process"]
    headers += ["seconds", "trials", f"survives {n_desc} fresh"]
    return md_table(headers, rows)


def stable_table(data: dict[str, Any], n_desc: str) -> str:
    rows = []
    for s in data["workloads"]:
        if s.get("status") == "skipped":
            continue
        f = s["fresh"]
        b, choice = f["bracket"], f["choice"]
        tried = ", ".join(
            f"{r['size']}{'✓' if r['rc'] == 0 else '✗' if r['rc'] == 3 else '?'}" for r in f["runs"]
        )
        cells = [Verdict.from_dict(s["targets"][k]).cell() for k in PROBE_TARGETS]
        stopped = f" (stopped: {b['stopped']})" if b["stopped"] else ""
        rows.append([s["label"], b["describe"] + stopped, tried or "–", choice.get("size"), *cells])
    headers = ["workload", f"stable max ({n_desc} fresh)", "fresh runs (✓ trained, ✗ OOM)"]
    headers += ["autoaccum choice", *(TARGETS[k] for k in PROBE_TARGETS)]
    return md_table(headers, rows)


def render(data: dict[str, Any]) -> str:
    cfg = data["config"]
    n, accum = cfg["fresh_steps"], cfg.get("fresh_accum", 1)
    n_desc = f"{n} steps × {accum} micro" if accum > 1 else f"{n} steps"
    targets = " · ".join(
        f"{TARGETS[k]}: {Verdict.from_dict(v).cell()}" for k, v in data["targets"].items()
    )
    return (
        f"### bench_probe — {env_line(data['env'])}\n\n{mode_note(cfg['tiny'])}\n\n"
        f"{tools_table(data, n_desc)}\n\n{stable_table(data, n_desc)}\n\nTargets: {targets}"
    )
