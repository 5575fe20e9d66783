"""The verdict on every target, per setting, from one or more benchmark output folders.

Each benchmark writes its targets' verdicts into its JSON; this gathers them into one
table (PASS, MISS with by how much, or not established) and one line per target over
all settings. The targets are meant to be judged in one run on one card: when the
folders' benchmarks ran on different cards or torch versions, the overall verdicts are
*not established* and the summary says why. A CPU tiny run is labelled a smoke test.

    python -m benchmarks.summary benchmarks/out/gpt2 benchmarks/out/resnet50 --out benchmarks/out
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.tables import md_table
from benchmarks.targets import OPEN, TARGETS, Verdict, not_established, overall

__all__ = ["collect", "render_summary", "verdict_table"]

BENCHES = ("probe", "overhead", "throughput")
#: which benchmark judges which target
SOURCE = {
    "choice_share": "probe",
    "choice_fresh": "probe",
    "probe_time": "probe",
    "throughput": "throughput",
    "overhead": "overhead",
}


def collect(dirs: Sequence[Path]) -> dict[str, list[dict[str, Any]]]:
    """``{bench: [its JSON from each folder that has one]}``."""
    found: dict[str, list[dict[str, Any]]] = {b: [] for b in BENCHES}
    for folder in dirs:
        for bench in BENCHES:
            path = folder / f"bench_{bench}.json"
            if path.exists():
                found[bench].append(json.loads(path.read_text()))
    return found


def _card(env: dict[str, Any]) -> str:
    return f"{env.get('device_name')} / torch {env.get('torch')}"


def verdict_table(found: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Verdict]]:
    """``{setting label: {target: verdict}}``, in the order the settings appear."""
    table: dict[str, dict[str, Verdict]] = {}
    for target, bench in SOURCE.items():
        for data in found[bench]:
            for s in data["workloads"]:
                row = table.setdefault(s["label"], {})
                if s.get("status") == "skipped":
                    row.setdefault(target, not_established(f"skipped: {s['reason']}"))
                elif target in s.get("targets", {}):
                    row[target] = Verdict.from_dict(s["targets"][target])
    return table


def render_summary(found: dict[str, list[dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """The markdown summary and its JSON."""
    envs = [d["env"] for runs in found.values() for d in runs]
    cards = sorted({_card(e) for e in envs})
    tiny = any(d["config"].get("tiny") for runs in found.values() for d in runs)
    table = verdict_table(found)
    rows = [[name, *(v[t].cell() if t in v else "–" for t in TARGETS)] for name, v in table.items()]
    lines = []
    verdicts: dict[str, Verdict] = {}
    for target, words in TARGETS.items():
        ran = [v[target] for v in table.values() if target in v]
        verdict = overall(ran)
        if len(cards) > 1:
            verdict = not_established(f"{verdict.detail}; but measured on {' and '.join(cards)}")
        verdicts[target] = verdict
        lines.append(f"- {words}: **{verdict.status}** ({verdict.detail})")
    head = (
        "CPU tiny smoke run: fault-injected OOM on tiny models, not a measurement. " if tiny else ""
    )
    where = cards[0] if len(cards) == 1 else "different cards: " + "; ".join(cards)
    markdown = (
        f"### Targets — {head}{where}\n\n"
        + md_table(["setting", *TARGETS.values()], rows)
        + "\n\n"
        + "\n".join(lines)
    )
    data = {
        "cards": cards,
        "tiny": tiny,
        "settings": {k: {t: v.to_dict() for t, v in row.items()} for k, row in table.items()},
        "targets": {t: v.to_dict() for t, v in verdicts.items()},
        "all_established": all(v.status != OPEN for v in verdicts.values()),
    }
    return markdown, data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", type=Path, nargs="+", help="folders holding bench_*.json")
    p.add_argument("--out", type=Path, default=None, help="write targets.md / targets.json here")
    args = p.parse_args(argv)
    markdown, data = render_summary(collect(args.dirs))
    print(markdown)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "targets.md").write_text(markdown + "\n")
        (args.out / "targets.json").write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
