"""The benchmarks' own logic, on CPU: the stable-maximum bracket (scripted fresh runs, exact
sequences of sizes), the verdicts, the sweep and its shares, the weights of ``fit`` against
the hand loop in float64, the variable-length data, the optional workloads and peers, the
summary; then smoke runs of the scripts in tiny mode (fault-injected OOM, not measurements).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from autoaccum import is_oom

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def bench(name: str) -> ModuleType:
    """``benchmarks.<name>`` (pytest puts the repository root on sys.path: pyproject.toml)."""
    return importlib.import_module(f"benchmarks.{name}")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture
def one_thread() -> Any:
    """One intra-op thread, as the tiny workers use: on a small shared box a second thread
    mostly waits for the first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the bracket


def script(stable: int) -> tuple[list[int], Any]:
    """A fresh-run oracle: a size trains when ≤ ``stable``; and the sizes it was asked."""
    tried: list[int] = []

    def fresh(size: int) -> bool:
        tried.append(size)
        return size <= stable

    return tried, fresh


def test_bracket_goes_up_past_a_top_candidate_that_trained() -> None:
    # GPT-2 uncapped on the H100: autoaccum 75/76 (77 failed in-process), Lightning binsearch
    # trained 79 before its margin, Accelerate 78. If 79 is the stable maximum:
    tried, fresh = script(stable=79)
    b = bench("stable").bracket_stable({64, 75, 76, 77, 78, 79}, fresh, upper=1024)
    assert tried == [79, 81, 80]  # 79 trains: a lower bound only, so up (2% of 79 = 2)
    assert (b.bound, b.stable_max, b.largest_ok, b.smallest_fail) == ("exact", 79, 79, 80)
    verdict = bench("targets").judge_share(75, b.largest_ok, b.smallest_fail)
    assert verdict.status == "MISS"
    assert verdict.detail == "94.9 % of 79 (exact), 2.1 points short"


def test_bracket_gallops_upward_doubling_the_step() -> None:
    tried, fresh = script(stable=30)
    b = bench("stable").bracket_stable({16, 21, 22, 23}, fresh, upper=1024)
    # 23 ✓, +1 → 24 ✓, +2 → 26 ✓, +4 → 30 ✓, +8 → 38 ✗, then bisect 34 ✗ 32 ✗ 31 ✗
    assert tried == [23, 24, 26, 30, 38, 34, 32, 31]
    assert (b.bound, b.stable_max) == ("exact", 30)


def test_bracket_goes_down_through_the_candidates_then_bisects() -> None:
    tried, fresh = script(stable=1800)
    b = bench("stable").bracket_stable({1864, 1863, 1826, 1774}, fresh)
    assert tried == [1864, 1863, 1826, 1774, 1800, 1813, 1806, 1803, 1801]
    assert (b.bound, b.stable_max) == ("exact", 1800)
    assert b.survives(1826) == (False, "measured")
    assert b.survives(1790) == (True, "inferred")
    assert b.survives(1900) == (False, "inferred")


def test_bracket_gallops_down_when_no_candidate_trains() -> None:
    tried, fresh = script(stable=1000)
    b = bench("stable").bracket_stable({1531, 1530, 1500}, fresh)
    assert tried[:8] == [1531, 1530, 1500, 1470, 1410, 1290, 1050, 570]
    assert (b.bound, b.stable_max) == ("exact", 1000)


def test_bracket_stops_at_max_runs_and_says_what_is_known() -> None:
    tried, fresh = script(stable=1000)
    b = bench("stable").bracket_stable({1531, 1530, 1500}, fresh, max_runs=3)
    assert tried == [1531, 1530, 1500]
    assert (b.bound, b.stable_max, b.smallest_fail) == ("at_most", None, 1500)
    assert b.stopped == "--max-fresh-runs 3 reached"
    assert b.describe() == "< 1500"
    assert bench("targets").judge_share(1490, None, 1500).status == "not established"


def test_bracket_reports_a_lower_bound_when_everything_up_to_upper_trains() -> None:
    tried, fresh = script(stable=10_000)
    b = bench("stable").bracket_stable({50, 60}, fresh, upper=64)
    assert tried == [60, 62, 64]
    assert (b.bound, b.largest_ok) == ("at_least", 64)
    assert "upper bound" in b.describe()


def test_bracket_ends_when_the_oracle_stops_it() -> None:
    stable = bench("stable")

    def fresh(size: int) -> bool:
        if size > 23:
            raise stable.Stop("time budget spent")
        return True

    b = stable.bracket_stable({22, 23}, fresh)
    assert (b.bound, b.largest_ok, b.stopped) == ("at_least", 23, "time budget spent")
    # only a lower bound, yet enough to settle it: 22 of at least 23 is at most 95.7 %
    share = bench("targets").judge_share(22, b.largest_ok, b.smallest_fail)
    assert (share.status, share.detail[:15]) == ("MISS", "at most 95.7 % ")


@pytest.mark.parametrize(
    ("choice", "ok", "fail", "status", "detail"),
    [
        (22, 22, 23, "PASS", "100.0 % of 22 (exact)"),
        (21, 23, 24, "MISS", "91.3 % of 23 (exact), 5.7 points short"),
        (23, 22, 23, "MISS", "23 is above the stable maximum (23 failed fresh)"),
        (21, 23, None, "MISS", "at most 91.3 % (stable ≥ 23), ≥ 5.7 points short"),
        (
            550,
            562,
            None,
            "not established",
            "at most 97.9 %: stable maximum only known to be ≥ 562",
        ),
        (99, 100, 102, "PASS", "98.0 %–99.0 % (stable 100–101)"),
        (
            97,
            100,
            102,
            "not established",
            "96.0 %–97.0 %: stable maximum only bracketed to 100–101",
        ),
        (5, None, None, "not established", "no size trained in a fresh process"),
    ],
)
def test_judge_share(
    choice: int, ok: int | None, fail: int | None, status: str, detail: str
) -> None:
    verdict = bench("targets").judge_share(choice, ok, fail)
    assert (verdict.status, verdict.detail) == (status, detail)


def test_the_other_verdicts_say_by_how_much() -> None:
    t = bench("targets")
    assert t.judge_at_most(0.53, 0.4, "x").detail == "0.530× > 0.4×, 32.5 % over"
    assert t.judge_at_most(0.30, 0.4, "x").status == "PASS"
    assert t.judge_at_most(None, 0.4, "Lightning result").detail == "no Lightning result"
    assert t.judge_at_least(0.976, 0.99, "x").detail == "97.6 % < 99.0 %, 1.4 points short"
    assert t.judge_fresh(200, False, 137).detail == "out of memory at step 138 of 200"
    assert t.judge_fresh(200, None).status == "not established"
    found = [t.Verdict("PASS", "a"), t.Verdict("not established", "b")]
    assert t.overall(found).status == "not established"
    assert t.overall([*found, t.Verdict("MISS", "c")]).status == "MISS"


# --------------------------------------------------------------------------- bench_probe


def fake_workers(monkeypatch: pytest.MonkeyPatch, stable: int) -> list[tuple[int, int]]:
    """Fake fresh runs: a size trains when ≤ ``stable``; returns (size, steps) asked."""
    asked: list[tuple[int, int]] = []
    common = bench("common")

    def run_worker(module: str, args: list[str], timeout: float) -> Any:
        assert module == "benchmarks.fresh_run"
        size, steps = int(args[args.index("--size") + 1]), int(args[args.index("--steps") + 1])
        asked.append((size, steps))
        rc = common.EXIT_OK if size <= stable else common.EXIT_OOM
        return common.WorkerOutcome(rc, {"seconds": 0.0, "steps_done": steps}, 0.0, "")

    monkeypatch.setattr(bench("bench_probe"), "run_worker", run_worker)
    return asked


def probe_args(**kw: Any) -> Namespace:
    base = {"fresh_steps": 50, "fresh_accum": 2, "choice_steps": 200, "max_fresh_runs": 16}
    base.update(deadline=None, tiny=True, grow=0.02, fresh_timeout=60.0)
    return Namespace(**{**base, **kw})


def tools(aa: tuple[int, int, int | None], **peers: tuple[int, int | None]) -> dict[str, Any]:
    micro, largest, first_fail = aa
    out: dict[str, Any] = {
        "autoaccum": {"status": "ok", "micro_batch": micro, "max_batch": largest, "seconds": 1.0}
    }
    out["autoaccum"]["first_fail"] = first_fail
    for name, (choice, before_margin) in peers.items():
        peer = {"status": "ok", "micro_batch": choice, "max_batch": before_margin, "seconds": 4.0}
        out[name.replace("_", "-")] = peer
    return out


def test_stable_search_brackets_exactly_then_runs_the_choice_200_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked = fake_workers(monkeypatch, stable=24)
    t = tools((21, 22, 23), lightning_binsearch=(22, 24), lightning_power=(16, 16))
    fresh = bench("bench_probe").stable_search(probe_args(), "gpt2", "24GiB", t)
    assert fresh["candidates"] == [16, 21, 22, 23, 24]  # Lightning's 24 before its margin
    assert asked == [(24, 50), (25, 50), (21, 200)]  # 24 ✓, 25 ✗: exact; then the choice
    assert fresh["bracket"]["stable_max"] == 24
    assert fresh["survives"]["autoaccum"] == {"ok": True, "how": "inferred"}
    targets = bench("bench_probe").targets_for(t, fresh)
    assert targets["choice_share"]["status"] == "MISS"  # 21 of 24 = 87.5 %
    assert targets["choice_fresh"] == {
        "status": "PASS",
        "detail": "200 steps without OOM",
        "value": None,
    }
    assert targets["probe_time"]["status"] == "PASS"  # 1 s vs 4 s = 0.25×


def test_a_choice_that_failed_a_shorter_run_is_not_run_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked = fake_workers(monkeypatch, stable=20)
    t = tools((21, 22, 23))
    fresh = bench("bench_probe").stable_search(probe_args(), "gpt2", "24GiB", t)
    assert asked == [(23, 50), (22, 50), (21, 50), (20, 50)]
    targets = bench("bench_probe").targets_for(t, fresh)
    assert targets["choice_fresh"]["status"] == "MISS"
    assert "inferred" in targets["choice_fresh"]["detail"]


# --------------------------------------------------------------------------- the sweep


def test_sweep_reaches_above_the_plan_and_down_to_an_eighth() -> None:
    sweep_sizes = bench("sweep").sweep_sizes
    # GPT-2 uncapped: target 256, plan 64 × 4 (ceiling 75), 76 trained in the probe
    assert sweep_sizes(256, 64, 76) == [8, 16, 24, 32, 52, 64, 86]
    # ResNet-50 @ 24 GiB: target 1024, plan 512 × 2, 561 trained: 1024 is the next plan
    sizes = sweep_sizes(1024, 512, 561, extra=[342, 256], min_micro=2)
    assert sizes == [64, 128, 205, 256, 342, 512, 1024]
    # when the target fits whole there is nothing above the plan
    assert max(sweep_sizes(1024, 1024, 1859)) == 1024


def test_shares_are_rates_over_the_best_measured_row() -> None:
    rows = [
        {"micro_batch": 282, "samples_per_s": 2214.0},
        {"micro_batch": 564, "samples_per_s": 2112.0},
        {"micro_batch": 600, "status": "oom"},
    ]
    out = bench("sweep").shares(rows, plan_micro=564, chosen_micro=282)
    assert out["best"] == {"micro_batch": 282, "samples_per_s": 2214.0}
    assert out["plan_share"] == pytest.approx(2112 / 2214)
    assert out["chosen_share"] == 1.0
    assert bench("sweep").shares(rows[2:], 564, 282)["chosen_share"] is None


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_bench_throughput_measures_the_plan_as_one_point_of_the_sweep() -> None:
    args = Namespace(tiny=True, target_batch=32, windows=1, warmup=1, deadline=None)
    s = bench("bench_throughput").measure(args, "gpt2", "24GiB", CPU)
    plan = s["plan"]["micro_batch"]
    assert (s["probe"]["largest_pass"], s["probe"]["max_micro"], plan) == (15, 14, 11)
    rows = {r["micro_batch"]: r for r in s["sweep"]}
    assert s["tried_above_plan"] == [16]
    assert rows[16]["status"] == "oom"  # the budget is 15
    assert min(rows) <= plan // 8 + 1
    rates = {k: r["samples_per_s"] for k, r in rows.items() if "samples_per_s" in r}
    best = max(rates.values())
    assert s["best"]["samples_per_s"] == best
    assert s["plan_share"] == pytest.approx(rates[plan] / best)
    chosen = s["chooser"]["plan"]["micro_batch"]
    assert s["chosen_share"] == pytest.approx(rates[chosen] / best)
    assert {r["micro_sizes"][0] for r in s["chooser"]["rates"]} <= set(rates)
    assert s["targets"]["throughput"]["value"] == s["chosen_share"]


# --------------------------------------------------------------------------- overhead


def overhead_args(**kw: Any) -> Namespace:
    base = {"tiny": True, "micro_batch": None, "accum_iter": 4, "steps": 4, "warmup": 1}
    return Namespace(**{**base, "repeats": 1, "dtype": "float64", **kw})


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("workload", ["gpt2", "varlen-gpt2"])
def test_fit_and_the_hand_loop_land_on_the_same_float64_weights(workload: str) -> None:
    s = bench("bench_overhead").measure(overhead_args(), workload, "uncapped", CPU)
    assert s["weights_max_rel_diff"] <= 1e-12
    assert s["time_ratio"] > 0
    assert s["targets"]["overhead"]["status"] in {"PASS", "MISS"}


@pytest.mark.usefixtures("one_thread")
def test_the_naive_hand_loop_misses_the_token_weighted_weights() -> None:
    """Negative control: dividing by accum_iter is not the token-level mean."""
    loops, workloads = bench("loops"), bench("workloads")
    wl = workloads.get_workload("varlen-gpt2", tiny=True)
    windows = bench("bench_overhead").make_windows(wl, CPU, 4, 4, torch.float64)
    results = []
    for count_fn in (wl.count_fn, None):
        model = workloads.build(wl, "uncapped", CPU).double()
        opt = wl.make_optimizer(model)
        for window in windows:
            loops.hand_window(model, opt, wl.loss_fn, window, "fp32", CPU, count_fn)
        results.append(loops.weights(model))
    assert loops.max_rel_diff(*results) > 1e-6


def test_window_clock_marks_every_step_without_syncing() -> None:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clock = bench("loops").WindowClock(opt, CPU)
    for _ in range(5):
        opt.step()
    clock.close()
    opt.step()  # after close: not marked
    assert len(clock.marks) == 5
    assert len(clock.step_seconds(warmup=2)) == 3
    assert clock.total_seconds(warmup=2) == pytest.approx(sum(clock.step_seconds(2)))
    cpu = clock.step_cpu_seconds(warmup=2)  # the thread's CPU time: what load leaves out
    assert len(cpu) == 3
    assert all(t >= 0 for t in cpu)


# --------------------------------------------------------------------------- workloads


def test_lengths_are_seeded_and_long_tailed() -> None:
    varlen = bench("varlen")
    spec = varlen.LengthSpec()
    lengths = varlen.draw_lengths(spec, 1 << 17, seed=0)
    assert torch.equal(lengths, varlen.draw_lengths(spec, 1 << 17, seed=0))
    assert not torch.equal(lengths, varlen.draw_lengths(spec, 1 << 17, seed=1))
    assert int(lengths.min()) >= 8
    assert int(lengths.max()) == 1024
    assert 120 <= float(lengths.float().median()) <= 136
    assert 0.002 < float((lengths == 1024).float().mean()) < 0.01  # about 1 in 200


def test_padding_is_per_micro_batch_and_the_budget_counts_padded_tokens() -> None:
    varlen, workloads = bench("varlen"), bench("workloads")
    inputs, targets = varlen.pad_collate([torch.arange(4), torch.arange(7)])
    assert inputs.shape == targets.shape == (2, 6)
    assert targets[0].tolist() == [1, 2, 3, -100, -100, -100]
    assert varlen.count_targets((inputs, targets)) == 3 + 6
    wl = workloads.get_workload("varlen-gpt2", tiny=True)
    model = workloads.build(wl, "24GiB", CPU)  # 15 × 32 = 480 padded tokens
    assert model.per_token
    assert model.budget == 480
    wl.loss_fn(model, (torch.zeros(16, 30, dtype=torch.long), torch.zeros(16, 30).long()))
    with pytest.raises(torch.OutOfMemoryError) as info:
        wl.loss_fn(model, (torch.zeros(16, 31, dtype=torch.long), torch.zeros(16, 31).long()))
    assert is_oom(info.value)
    batch = wl.probe_batch(CPU)  # the first window, padded together, as fit's probe sees it
    assert batch[0].shape[0] == wl.target_batch


@pytest.mark.usefixtures("one_thread")
def test_bench_tokens_tiny_keeps_every_step_at_its_tokens_with_less_padding(
    tmp_path: Path,
) -> None:
    """A smoke run, not a figure: the token budget's steps all hold the target's loss tokens
    (spread 0), its padding is under the fixed-sample plan's, and neither runs out of memory
    on the emulated device after the probe."""
    argv = ["--tiny", "--samples", "96", "--out", str(tmp_path)]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert bench("bench_tokens").main(argv) == 0
    out = json.loads((tmp_path / "bench_tokens.json").read_text())
    fixed, tokens = out["fixed"], out["tokens"]
    assert tokens["spread"] == 0
    assert fixed["spread"] > 0
    assert set(tokens["per_step"][:-1]) == {512.0}
    assert tokens["padding_share"] < fixed["padding_share"]
    assert tokens["padding_share"] <= 0.10
    assert fixed["oom_retries"] == tokens["oom_retries"] == 0
    assert tokens["loss_tokens"] == fixed["loss_tokens"]  # the same epoch, every token once
    assert "token budget over fixed samples" in printed.getvalue()


def test_optional_workloads_are_skipped_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    workloads = bench("workloads")
    assert workloads.missing("gpt2") is None
    if not installed("torchvision"):
        assert workloads.missing("tv-resnet50") == "torchvision not installed"
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "transformers" else real(n, *a)
    )
    assert workloads.missing("hf-gpt2") == "transformers not installed"


@pytest.mark.skipif(not installed("transformers"), reason="transformers is not installed")
def test_the_hf_gpt2_workload_trains_its_own_loss_under_the_budget() -> None:
    workloads = bench("workloads")
    wl = workloads.get_workload("hf-gpt2", tiny=True)
    model = workloads.build(wl, "24GiB", CPU)
    assert type(model.model).__name__ == "GPT2LMHeadModel"
    wl.loss_fn(model, wl.make_batch(15, CPU, 0)).backward()
    with pytest.raises(torch.OutOfMemoryError):
        wl.loss_fn(model, wl.make_batch(16, CPU, 0))


@pytest.mark.skipif(installed("composer"), reason="composer is installed")
def test_composer_is_a_skipped_peer_when_not_installed() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = bench("probe_worker").main(
            ["--tool", "composer", "--workload", "gpt2", "--cap", "24GiB", "--tiny"]
        )
    assert rc == 0
    result = json.loads(out.getvalue().split("BENCH_RESULT ", 1)[1])
    assert (result["status"], result["reason"]) == ("skipped", "composer not installed")


# --------------------------------------------------------------------------- summary


def bench_json(bench_name: str, card: str, settings: list[dict[str, Any]]) -> dict[str, Any]:
    env = {"device_name": card, "torch": "2.11.0", "date": "2026-11-25"}
    return {"bench": bench_name, "env": env, "config": {"tiny": False}, "workloads": settings}


def test_summary_gathers_every_target_and_refuses_mixed_cards(tmp_path: Path) -> None:
    summary, t = bench("summary"), bench("targets")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    share = t.Verdict("PASS", "98.2 % of 562 (exact)", 0.982).to_dict()
    probe = {"label": "resnet50@24GiB", "targets": {"choice_share": share}}
    why = "torchvision not installed"
    skipped = {"label": "tv-resnet50@24GiB", "status": "skipped", "reason": why}
    data = bench_json("probe", "H100", [probe, skipped])
    (a / "bench_probe.json").write_text(json.dumps(data))
    miss = t.Verdict("MISS", "1.020× > 1.01×, 1.0 % over").to_dict()
    over = {"label": "gpt2@uncapped", "targets": {"overhead": miss}}
    (b / "bench_overhead.json").write_text(json.dumps(bench_json("overhead", "H100", [over])))
    markdown, out = summary.render_summary(summary.collect([a, b]))
    assert out["cards"] == ["H100 / torch 2.11.0"]
    assert "PASS: 98.2 % of 562 (exact)" in markdown
    assert "not established: skipped: torchvision not installed" in markdown
    assert out["targets"]["overhead"]["status"] == "MISS"
    assert out["targets"]["choice_share"]["status"] == "not established"  # one skipped
    (b / "bench_overhead.json").write_text(json.dumps(bench_json("overhead", "A100", [over])))
    markdown, out = summary.render_summary(summary.collect([a, b]))
    assert out["targets"]["overhead"]["status"] == "not established"
    assert "measured on" in out["targets"]["overhead"]["detail"]


# --------------------------------------------------------------------------- smoke runs
# The orchestrators run in this process; the workers they start are fresh processes, as
# on a GPU (each costs seconds of torch import on a small CPU box, so they are few).


@pytest.mark.slow
def test_bench_probe_tiny_brackets_exactly_and_runs_the_choice(tmp_path: Path) -> None:
    argv = ["--tiny", "--out", str(tmp_path), "--workloads", "gpt2", "--caps", "24GiB"]
    argv += ["--tools", "autoaccum,composer", "--fresh-steps", "2", "--choice-steps", "3"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench("bench_probe").main(argv) == 0
    data = json.loads((tmp_path / "bench_probe.json").read_text())
    (setting,) = data["workloads"]
    aa = setting["tools"]["autoaccum"]
    assert (aa["status"], aa["max_batch"], aa["first_fail"], aa["micro_batch"]) == (
        "ok",
        15,
        16,
        14,
    )
    if not installed("composer"):
        assert setting["tools"]["composer"] == {
            "status": "skipped",
            "reason": "composer not installed",
        }
    fresh = setting["fresh"]
    assert [(r["size"], r["steps"], r["rc"]) for r in fresh["runs"]] == [(16, 2, 3), (15, 2, 0)]
    assert (fresh["bracket"]["bound"], fresh["bracket"]["stable_max"]) == ("exact", 15)
    choice = fresh["choice"]
    assert (choice["size"], choice["ran"], choice["steps"]) == (14, True, 3)
    # fault injection has no gap between in-process and fresh: the margin's sample misses
    assert setting["targets"]["choice_share"]["status"] == "MISS"
    assert setting["targets"]["choice_fresh"]["status"] == "PASS"
    assert "| gpt2@24GiB | 15 (exact: 16 fails) | 16✗, 15✓ | 14 |" in out.getvalue()


@pytest.mark.slow
@pytest.mark.skipif(
    not (installed("lightning") or installed("pytorch_lightning")), reason="needs Lightning"
)
@pytest.mark.usefixtures("one_thread")
def test_lightning_binsearch_reports_its_maximum_before_the_margin() -> None:
    workloads = bench("workloads")
    wl = workloads.get_workload("gpt2", tiny=True)
    found = bench("peers").run_lightning(wl, "24GiB", CPU, "binsearch")
    assert found["max_batch"] == 15  # the budget: it trained 15, and 16 failed
    assert found["micro_batch"] == 14  # int(15 × 0.95)
    assert dict(zip(found["sizes"], found["fits"], strict=True))[16] is False


@pytest.mark.slow
def test_run_all_tiny_writes_the_summary_with_every_target(tmp_path: Path) -> None:
    argv = ["--tiny", "--out", str(tmp_path), "--workloads", "gpt2", "--only", "overhead"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench("run_all").main(argv) == 0
    overhead = json.loads((tmp_path / "bench_overhead.json").read_text())
    (setting,) = overhead["workloads"]
    assert setting["label"] == "gpt2@uncapped"
    assert setting["weights_max_rel_diff"] < 1e-5  # float32: rounding, not a bug
    summary = (tmp_path / "summary.md").read_text()
    assert "### bench_overhead" in summary
    assert "CPU tiny smoke run" in summary
    assert "- fit ≤ 1.01× the hand-written loop: **" in summary
    assert "- choice ≥ 97% of the exactly bracketed stable maximum: **not established**" in summary
    assert summary in out.getvalue()
    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert [(r["bench"], r["rc"]) for r in runs] == [("overhead", 0)]


@pytest.mark.slow
def test_bench_sync_times_the_reductions_and_the_windows_on_two_gloo_ranks(
    tmp_path: Path,
) -> None:
    """Per parameter, in buckets and DDP's overlap, on 2 CPU processes (a smoke run), in a
    process of its own bounded by a timeout (it spawns the ranks)."""
    argv = ["--tiny", "--variants", "--models", "blocks,mlp1024", "--steps", "2"]
    argv += ["--warmup", "1", "--repeats", "1", "--reduce-reps", "2", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_sync", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "bench_sync.json").read_text())
    assert (data["backend"], data["config"]["world"]) == ("gloo", 2)
    blocks, mlp = data["models"]
    assert (blocks["model"], blocks["tensors"], mlp["tensors"]) == ("blocks", 40, 6)
    for m in (blocks, mlp):
        assert set(m["reduction_median_s"]) == {
            "per_parameter",
            "bucketed",
            "all_at_once",
            "persistent",
            "views",
        }
        assert set(m["window_median_s"]) == {"per_parameter", "bucketed", "overlap"}
        assert len(m["window_s"]["overlap"]) == 2  # the steps after warm-up, one run
        win = m["window_median_s"]
        assert m["window_bucketed_over_overlap"] == pytest.approx(win["bucketed"] / win["overlap"])
    assert "| blocks | 40 |" in proc.stdout


# --------------------------------------------------------------------------- the GPU run


def test_gpu_run_adds_expandable_segments_to_the_users_allocator_settings() -> None:
    gpu_run = bench("gpu_run")
    on = "expandable_segments:True"
    assert gpu_run.expandable({}) == {"PYTORCH_CUDA_ALLOC_CONF": on}
    assert gpu_run.expandable({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}) == {
        "PYTORCH_CUDA_ALLOC_CONF": f"max_split_size_mb:128,{on}"
    }
    # torch's newer name, and a user's own choice of expandable segments, kept as they are
    mine = {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}
    assert gpu_run.expandable(mine) == mine


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (exited, or a zombie nobody has reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_gpu_run_stops_a_part_at_the_end_of_its_slot_with_what_it_started(
    tmp_path: Path,
) -> None:
    gpu_run = bench("gpu_run")
    pid_file = tmp_path / "child.pid"
    part = gpu_run.Part(
        "slow",
        1.0,
        ["gpu_run_sleeper", str(pid_file)],
        env={"PYTHONPATH": str(Path(__file__).parent)},
        deadline_flag=False,
    )
    start = time.monotonic()
    record = gpu_run.run_part(part, tmp_path, time.time() + 3)
    assert (record["rc"], record["stopped"]) == (None, True)
    assert time.monotonic() - start < 15
    child = int(pid_file.read_text())  # the part's own child: stopped with it
    until = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < until:
        time.sleep(0.05)
    assert _gone(child)


@pytest.mark.slow
def test_gpu_run_tiny_runs_every_part_in_order_within_its_slot(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_run.py"), "--tiny", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_run.json").read_text())
    parts = report["parts"]
    assert [p["part"] for p in parts] == [
        "1-gpu-tests",
        "2-probe-default",
        "2-probe-expandable",
        "3-probe-hf-gpt2",
        "4-throughput",
        "5-overhead",
    ]
    assert [(p["rc"], p["stopped"]) for p in parts] == [(0, False)] * 6
    ends = [p["slot_end"] for p in parts]
    assert ends == sorted(ends)
    assert ends[-1] <= report["budget_s"]
    assert "expandable_segments:True" in json.dumps(parts[2]["env"])
    assert (tmp_path / "1-gpu-tests" / "junit.xml").exists()
    # the fault-injected limit, bracketed exactly in the default allocator's fresh runs
    table = (tmp_path / "2-allocator.md").read_text()
    assert "| default | 15 (first fail 16) | 15 | 16 | 14 |" in table
    targets = (tmp_path / "targets.md").read_text()
    assert "fit ≤ 1.01× the hand-written loop" in targets
    assert "chosen plan's samples/s" in targets
