"""A long run: evaluation, a JSON log, checkpoints, and an exact resume after the process is
killed.

    python examples/long_run.py [FOLDER]

The run is started in a child process, which is killed with SIGKILL after its 6th optimizer
step (the newest checkpoint is then the one after step 4). Started again with
``resume="auto"``, it continues from that checkpoint. Its final weights are then compared
with those of a run that was never interrupted: bit-identical, with a shuffled DataLoader,
dropout, AdamW and a learning-rate schedule (float64 on the CPU).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoaccum

TARGET, EPOCHS = 64, 3
PAUSE_AFTER = 6  # the child stops here, to be killed


def make_data(samples: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 20, generator=gen, dtype=torch.float64)
    return TensorDataset(x, x[:, :3].argmax(dim=1))


class PauseAfter(autoaccum.Callback):
    """Leaves a mark after step ``step`` and waits there, to be killed."""

    def __init__(self, step: int, mark: Path) -> None:
        self.step, self.mark = step, mark

    def on_step(self, run: autoaccum.RunView) -> None:
        if run.state().step == self.step:
            self.mark.touch()
            time.sleep(300)


def train(folder: Path, *extra: autoaccum.Callback) -> tuple[nn.Module, autoaccum.FitResult]:
    """The run: the same code for the first start and every restart."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 3)).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=24)
    result = autoaccum.fit(
        model,
        DataLoader(make_data(512, seed=0), batch_size=32, shuffle=True),
        target_batch=TARGET,
        epochs=EPOCHS,
        max_micro=24,  # 22 + 21 + 21: a ceiling of our own, so the CPU shows accumulation
        optimizer=optimizer,
        scheduler=scheduler,
        callbacks=[
            autoaccum.Evaluate(DataLoader(make_data(128, seed=1), batch_size=64), every=4),
            autoaccum.JsonLog(folder / "train.jsonl"),
            autoaccum.Checkpoint(folder / "ckpt", every=4, keep=2),
            *extra,
        ],
        resume="auto",  # the newest checkpoint in folder/ckpt, or a new run if there is none
        progress=False,
        report=False,
    )
    return model, result


def main(folder: Path) -> None:
    # 1. start the run in a child process; kill it (SIGKILL) once it has taken 6 steps
    mark = folder / "paused"
    child = subprocess.Popen([sys.executable, __file__, "--child", str(folder)])
    deadline = time.monotonic() + 240
    while not mark.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    if not mark.exists():
        raise SystemExit(f"the child ended before step {PAUSE_AFTER} (exit {child.returncode})")
    print(
        f"killed the run after step {PAUSE_AFTER}; checkpoints: "
        f"{sorted(p.name for p in (folder / 'ckpt').glob('step-*.pt'))}"
    )

    # 2. start it again: resume="auto" continues from the newest checkpoint (after step 4)
    resumed, result = train(folder)
    print(f"resumed run: {result.optimizer_steps} steps in all, loss {result.losses[-1]:.4f}")
    for evaluation in result.evaluations:
        print(f"  step {evaluation['step']:2d}: eval loss {evaluation['eval_loss']:.4f}")
    lines = (folder / "train.jsonl").read_text().splitlines()
    print(f"  {len(lines)} lines in train.jsonl (steps 5 and 6 twice: before the kill and after)")

    # 3. a run that was never interrupted ends on the same weights, bit for bit
    with tempfile.TemporaryDirectory() as other:
        straight, _ = train(Path(other))
    same = all(
        torch.equal(a, b) for a, b in zip(resumed.parameters(), straight.parameters(), strict=True)
    )
    print(f"resumed run == uninterrupted run, bit for bit: {same}")
    if not same:
        raise SystemExit("unexpected: the resumed run's weights differ")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        folder = Path(sys.argv[2])
        train(folder, PauseAfter(PAUSE_AFTER, folder / "paused"))
    elif len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
