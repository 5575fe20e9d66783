"""On a real GPU: real out-of-memory errors, memory back to baseline, a choice that survives.

Skipped (not silently passed) without CUDA. Cards are emulated smaller with
``torch.cuda.set_per_process_memory_fraction`` so that OOMs come quickly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gpu_worker import batch, loss_fn, workload

import autoaccum

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CAP_GIB = 2.0
UPPER = 2**17
WORKER = Path(__file__).with_name("gpu_worker.py")
#: subprocesses import autoaccum from this checkout and gpu_worker from tests/, installed or not
PYTHONPATH = os.pathsep.join([str(WORKER.parent.parent), str(WORKER.parent)])


@pytest.fixture
def capped() -> Iterator[torch.device]:
    device = torch.device("cuda", torch.cuda.current_device())  # the cap needs an index
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(CAP_GIB * 2**30 / total, device)
    autoaccum.free_memory(device)
    yield device
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    autoaccum.free_memory(device)


def test_real_oom_is_detected_and_recovered(capped: torch.device) -> None:
    model, _opt = workload(capped)
    with pytest.raises(Exception) as info:  # noqa: PT011 - the type is what is under test
        loss_fn(model, batch(2**17, capped)).backward()
    assert autoaccum.is_oom(info.value)
    del info
    autoaccum.free_memory(capped)
    loss_fn(model, batch(8, capped)).backward()  # the device is usable again


def test_probe_finds_a_memory_bound_size_and_restores_memory(capped: torch.device) -> None:
    model, opt = workload(capped)
    # A real run has cuBLAS workspaces and handles already: create them before the baseline.
    loss_fn(model, batch(2, capped)).backward()
    model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # before the baseline
    autoaccum.free_memory(capped)
    baseline = torch.cuda.memory_allocated(capped)
    result = autoaccum.probe(
        model, batch(4, capped), loss_fn=loss_fn, optimizer=opt, upper=UPPER, precision="bf16"
    )
    assert result.hit_limit, result.trials
    assert 1 < result.max_micro < result.largest_pass < UPPER
    assert all(t.peak_allocated is not None for t in result.trials)
    assert torch.cuda.memory_allocated(capped) == baseline
    assert len(opt.state) == 0
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value), key
    failed = [t.size for t in result.trials if not t.passed]
    assert min(failed) == result.largest_pass + 1  # the bisection closed the gap exactly


def test_chosen_size_trains_50_steps_in_a_fresh_process(capped: torch.device) -> None:
    model, opt = workload(capped)
    result = autoaccum.probe(
        model, batch(4, capped), loss_fn=loss_fn, optimizer=opt, upper=UPPER, precision="bf16"
    )
    del model, opt
    autoaccum.free_memory(capped)
    proc = subprocess.run(
        [
            sys.executable,
            str(WORKER),
            "--cap-gib",
            str(CAP_GIB),
            "--micro",
            str(result.max_micro),
            "--steps",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_fit_on_gpu_with_bf16_and_report(
    capped: torch.device, capsys: pytest.CaptureFixture[str]
) -> None:
    model, _ = workload(capped)
    x, y = batch(2048, torch.device("cpu"))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=64, pin_memory=True
    )
    result = autoaccum.fit(
        model, loader, target_batch=1024, loss_fn=loss_fn, progress=False, report=True
    )
    assert result.precision == "bf16"
    assert sum(result.plan.micro_sizes) == 1024
    assert result.optimizer_steps == 2
    assert result.memory is not None
    out = capsys.readouterr().out
    assert "GiB" in out


def test_nccl_world_size_one_through_torchrun_env(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        "import torch, autoaccum\n"
        "from gpu_worker import batch, loss_fn, workload\n"
        "model, _ = workload(torch.device('cuda'))\n"
        "x, y = batch(512, torch.device('cpu'))\n"
        "data = torch.utils.data.TensorDataset(x, y)\n"
        "r = autoaccum.fit(model, torch.utils.data.DataLoader(data), 256, loss_fn=loss_fn,"
        " max_micro=100, progress=False, report=False)\n"
        "assert r.plan.micro_sizes == (86, 85, 85), r.plan\n"
        "assert r.optimizer_steps == 2\n"
        "print('ok', r.device)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": PYTHONPATH,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29533",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok cuda:0" in proc.stdout
