"""The command line: subcommands, JSON, exit codes (0 ok, 1 AutoAccumError, 2 usage)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    assert "Plan: target_batch 16 = 16 × 1 (accum_iter 1) × 1 rank" in out
    assert "Memory at micro_batch 16" in out
    assert "not measurable on cpu" in out
    assert "GiB = 2^30 bytes" in out


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
