"""The command line: subcommands, JSON, exit codes (0 ok, 1 AutoAccumError, 2 usage)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
from helpers import hide_package

from autoaccum import __version__
from autoaccum.cli import main

TESTS = Path(__file__).parent
ROOT = TESTS.parent


@pytest.fixture(autouse=True)
def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "autoaccum", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )


def test_report_json(capsys: pytest.CaptureFixture[str]):
    assert main(["report", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["device"] == "cpu"
    assert data["gpu"] is None
    assert "not a CUDA device" in data["gpu_why"]
    assert data["host"]["total"] > 0


def test_report_text(capsys: pytest.CaptureFixture[str]):
    assert main(["report", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Memory on cpu" in out
    assert "RAM total" in out
    assert "GiB" in out


def test_version_and_usage_errors(capsys: pytest.CaptureFixture[str]):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"autoaccum {__version__}"
    assert main([]) == 2
    assert main(["report", "--bogus"]) == 2
    assert main(["probe", "cli_factory:make"]) == 2  # --target-batch is required
    assert main(["report", "--device", "nonsense"]) == 2
    assert "bad --device" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected MODULE:FACTORY"),
        ("no_such_module_xyz:make", "no module named 'no_such_module_xyz'"),
        ("cli_factory:missing", "has no attribute 'missing'"),
        ("cli_factory:NOT_CALLABLE", "not a callable factory"),
        ("cli_factory:bad_return", "returned int"),
        ("cli_factory:no_model", "without model"),
        ("./nowhere.py:make", "no such file"),
    ],
)
def test_bad_factory_is_a_usage_error(spec: str, message: str, capsys: pytest.CaptureFixture[str]):
    assert main(["probe", spec, "--target-batch", "8"]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_probe_prints_trials_plan_and_breakdown(capsys: pytest.CaptureFixture[str]):
    assert main(["probe", "cli_factory:make", "--target-batch", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Probe on cpu" in out
    assert "optimizer state 3.0 KiB" in out  # AdamW's moments, as the trials allocated them
    assert out.count("✓") == 2  # on the CPU: the smallest size, then the target
    assert "largest that passed: 16" in out
    assert "plan: target_batch 16 = 16 × 1 (accum_iter 1) × 1 rank — the whole window fits" in out
    assert "Memory at micro_batch 16: fixed" in out
    assert "not measurable on cpu" in out
    assert "headroom" not in out  # no table of the host's RAM that says nothing
    assert "GiB = 2^30 bytes" in out


def test_probe_on_an_emulated_device_runs_into_its_limit(capsys: pytest.CaptureFixture[str]):
    argv = ["probe", "cli_factory:make", "--target-batch", "256", "--budget-mib", "0.05"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "✗ oom" in out  # the probe ran into the emulated limit, as on a GPU
    assert "plan: target_batch 256 = 128 × 2 (accum_iter 2) × 1 rank — 160 fit in the " in out
    assert "emulated device's 51.2 KiB, less a 2% margin: max_micro 156" in out
    assert "activations" in out
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["breakdown"]["capacity"] == int(0.05 * 2**20)
    assert "emulated device" in data["breakdown"]["capacity_source"]
    # parameters + gradients + AdamW's two moments are resident: 4 × 1,548 bytes
    assert data["probe"]["trials"][0]["peak_allocated"] > 4 * (8 * 32 + 32 + 32 * 3 + 3) * 4
    assert data["probe"]["largest_pass"] == 160


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--budget-mib", "0"], "--budget-mib: must be a finite number > 0, got 0"),
        (["--budget-mib", "lots"], "expected a number > 0, got 'lots'"),
        (["--budget-mib", "nan"], "must be a finite number > 0"),
        (["--plot", "probe.svg"], "--plot draws the trials against the memory limit, and the CPU"),
        (["--budget-mib", "1", "--plot", "probe.txt"], "bad --plot: cannot draw into probe.txt"),
        (["--budget-mib", "1", "--plot", "no/such/dir/p.svg"], "the folder no/such/dir does not"),
    ],
)
def test_bad_budget_or_plot_is_a_usage_error_before_the_factory_runs(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
):
    # cli_factory:raises would fail if it ran: the arguments are refused first
    assert main(["probe", "cli_factory:raises", "--target-batch", "8", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_plot_draws_the_trials_against_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    pytest.importorskip("matplotlib")
    svg = tmp_path / "probe.svg"
    argv = ["probe", "cli_factory:make", "--target-batch", "256", "--budget-mib", "0.05"]
    assert main([*argv, "--plot", str(svg)]) == 0
    assert f"drawn: {svg}" in capsys.readouterr().out
    texts = ["".join(t.itertext()) for t in ElementTree.parse(svg).iter() if t.tag.endswith("text")]
    for label in (
        "limit 51.2 KiB",
        "margin: 2% kept spare",
        "peak line: 6.0 KiB + 288 B/sample",
        "passed",
        "out of memory",
        "max_micro 156",
        "micro_batch 128 (accum_iter 2)",
        "micro-batch size (samples)",
        "peak memory (KiB)",
    ):
        assert label in texts, (label, texts)


def test_plot_without_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    hide_package(monkeypatch, "matplotlib")
    argv = ["probe", "cli_factory:raises", "--target-batch", "8", "--budget-mib", "1"]
    assert main([*argv, "--plot", str(tmp_path / "p.svg")]) == 1
    err = capsys.readouterr().err
    assert "needs the 'matplotlib' package" in err
    assert "pip install 'autoaccum[plot]'" in err
    assert not (tmp_path / "p.svg").exists()


def test_probe_json_with_a_tuple_factory_from_a_file(capsys: pytest.CaptureFixture[str]):
    spec = f"{TESTS / 'cli_factory.py'}:make_tuple"
    assert main(["probe", spec, "--target-batch", "12", "--margin", "0.1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"probe", "plan", "breakdown", "memory"}
    assert data["probe"]["largest_pass"] == 12
    assert [t["size"] for t in data["probe"]["trials"]] == [1, 12]
    assert data["plan"]["micro_sizes"] == [12]
    assert data["breakdown"]["fixed_parts"]["parameters"] == (8 * 32 + 32 + 32 * 3 + 3) * 4


def test_autoaccum_error_exits_1_without_traceback(capsys: pytest.CaptureFixture[str]):
    assert main(["probe", "cli_factory:make", "--target-batch", "8", "--margin", "0.7"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: margin must be in [0, 0.5)")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["probe", "cli_factory:make", "--target-batch", "0"], "must be ≥ 1, got 0"),
        (["probe", "cli_factory:make", "--target-batch", "many"], "expected a whole number"),
        (["demo", "--target-batch", "0"], "must be ≥ 1, got 0"),
        (["demo", "--epochs", "-1"], "must be ≥ 1, got -1"),
    ],
)
def test_counts_below_one_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cli_factory:raises", "cli_factory:raises() raised ValueError: no such checkpoint"),
        ("cli_factory:string_optimizer", "optimizer must be a torch.optim.Optimizer"),
        ("cli_factory:string_loss", "loss_fn must be callable"),
    ],
)
def test_a_factory_that_fails_or_breaks_the_contract_exits_2_without_traceback(
    spec: str, message: str, capsys: pytest.CaptureFixture[str]
):
    assert main(["probe", spec, "--target-batch", "8", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    if spec.endswith("raises"):
        assert "cli_factory.py:" in err  # where the factory raised


def test_a_device_this_machine_lacks_is_a_usage_error(capsys: pytest.CaptureFixture[str]):
    assert main(["probe", "cli_factory:make", "--target-batch", "8", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "sees no CUDA device" in err
    assert "available here: cpu" in err
    assert "AssertionError" not in err
    assert "Traceback" not in err


def test_demo_runs_from_the_command_line(capsys: pytest.CaptureFixture[str]):
    argv = ["demo", "--epochs", "1", "--samples", "300", "--target-batch", "64", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["target_batch"] == 64
    assert out["optimizer_steps"] == 5


def test_python_dash_m_report_json():
    done = _run("report", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["gpu"] is None
    assert data["host"]["process_rss"] > 0


def test_python_dash_m_bad_factory_exits_2():
    done = _run("probe", "cli_factory:missing", "--target-batch", "4")
    assert done.returncode == 2
    assert "has no attribute 'missing'" in done.stderr
    assert "Traceback" not in done.stderr
