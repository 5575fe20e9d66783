"""Worker: run one batch-size finder on one workload in this fresh process.

Tools: ``autoaccum`` (:func:`autoaccum.probe`), ``lightning-power`` and
``lightning-binsearch`` (``Tuner.scale_batch_size`` on a minimal LightningModule with a
``batch_size`` attribute and a DataLoader over the synthetic samples, ``steps_per_trial=3``),
and ``accelerate`` (``find_executable_batch_size`` from ``workload.upper``, each trial
3 training steps under bf16 autocast). A tool that is not installed answers
``status: "skipped"``. The answer is one marked JSON line on stdout:
``{tool, status, micro_batch, max_batch, seconds, trials, sizes, ...}``; ``seconds`` is the
wall-clock of the search call alone (model already built on the device).

    python -m benchmarks.probe_worker --tool autoaccum --workload gpt2 --cap 24GiB
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import autoaccum
from benchmarks.common import (
    apply_cap,
    configure_threads,
    emit,
    peak_bytes,
    peer_module,
    pick_device,
    reset_peak,
    sync,
)
from benchmarks.loops import hand_window
from benchmarks.workloads import CAPS, WORKLOADS, Workload, batch_len, build, get_workload

TOOLS = ("autoaccum", "lightning-power", "lightning-binsearch", "accelerate")
TOOL_PEER = {
    "autoaccum": None,
    "lightning-power": "lightning",
    "lightning-binsearch": "lightning",
    "accelerate": "accelerate",
}
STEPS_PER_TRIAL = 3  #: the peers' trials, as in the issue's reference runs
PROBE_SAMPLES = 8  #: real samples handed to autoaccum.probe, which tiles them


def run_autoaccum(wl: Workload, cap: str, device: torch.device) -> dict[str, Any]:
    model = build(wl, cap, device)
    optimizer = wl.make_optimizer(model)
    batch = wl.make_batch(PROBE_SAMPLES, device, 0)
    sync(device)
    start = time.perf_counter()
    found = autoaccum.probe(
        model,
        batch,
        loss_fn=wl.loss_fn,
        optimizer=optimizer,
        upper=wl.upper,
        precision=wl.precision(device),
        device=device,
    )
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "micro_batch": found.max_micro,
        "max_batch": found.largest_pass,
        "seconds": seconds,
        "trials": len(found.trials),
        "sizes": [t.size for t in found.trials],
        "fits": [t.passed for t in found.trials],
        "first_fail": min((t.size for t in found.trials if not t.passed), default=None),
        # where the time and memory went, trial by trial (the search's own records)
        "trial_records": [t.to_dict() for t in found.trials],
        "trial_seconds": sum(t.seconds for t in found.trials),
    }


class SyntheticSamples(Dataset[Any]):
    """A long map-style dataset cycling over a fixed pool of synthetic samples (CPU)."""

    def __init__(self, wl: Workload, pool: int = 64, length: int = 1 << 22) -> None:
        self.pool = wl.make_batch(pool, torch.device("cpu"), 0)
        self.pool_size = pool
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        j = i % self.pool_size
        if isinstance(self.pool, torch.Tensor):
            return self.pool[j]
        return tuple(t[j] for t in self.pool)


def run_lightning(wl: Workload, cap: str, device: torch.device, mode: str) -> dict[str, Any]:
    module = peer_module("lightning")
    if module is None:
        raise RuntimeError("lightning is not installed")
    pl = importlib.import_module("lightning.pytorch" if module == "lightning" else module)
    tuner_mod = importlib.import_module(f"{pl.__name__}.tuner")
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    sizes: list[int] = []

    class LitWorkload(pl.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model
            self.batch_size = 2

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if batch_idx == 0:
                sizes.append(batch_len(batch))
            return wl.loss_fn(self.model, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return wl.make_optimizer(self.model)

        def train_dataloader(self) -> DataLoader[Any]:
            return DataLoader(SyntheticSamples(wl), batch_size=self.batch_size, shuffle=False)

    lit = LitWorkload(build(wl, cap, device))
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            precision="bf16-mixed" if wl.precision(device) == "bf16" else "32-true",
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        sync(device)
        start = time.perf_counter()
        found = tuner_mod.Tuner(trainer).scale_batch_size(
            lit, mode=mode, steps_per_trial=STEPS_PER_TRIAL, init_val=2, max_trials=25
        )
        sync(device)
        seconds = time.perf_counter() - start
    return {
        "micro_batch": int(found) if found is not None else None,
        "seconds": seconds,
        "trials": len(sizes),
        "sizes": sizes,
    }


def run_accelerate(wl: Workload, cap: str, device: torch.device) -> dict[str, Any]:
    from accelerate.utils import find_executable_batch_size

    model = build(wl, cap, device)
    optimizer = wl.make_optimizer(model)
    precision = wl.precision(device)
    sizes: list[int] = []

    @find_executable_batch_size(starting_batch_size=wl.upper)  # type: ignore[misc]
    def trial(batch_size: int) -> int:
        sizes.append(batch_size)
        optimizer.zero_grad(set_to_none=True)  # drop a failed trial's gradients
        batch = wl.make_batch(batch_size, device, 0)
        for _ in range(STEPS_PER_TRIAL):
            hand_window(model, optimizer, wl.loss_fn, [batch], precision, device)
        sync(device)
        return batch_size

    sync(device)
    start = time.perf_counter()
    found = trial()
    seconds = time.perf_counter() - start
    return {"micro_batch": int(found), "seconds": seconds, "trials": len(sizes), "sizes": sizes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tool", choices=TOOLS, required=True)
    p.add_argument("--workload", choices=list(WORKLOADS), required=True)
    p.add_argument("--cap", choices=list(CAPS), required=True)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")

    result: dict[str, Any] = {"tool": args.tool, "workload": args.workload, "cap": args.cap}
    peer = TOOL_PEER[args.tool]
    if peer is not None and peer_module(peer) is None:
        emit({**result, "status": "skipped", "reason": f"{peer} not installed"})
        return 0
    configure_threads(args.tiny)
    device = pick_device(args.tiny)
    apply_cap(args.cap, device)
    wl = get_workload(args.workload, args.tiny)
    reset_peak(device)
    try:
        if args.tool == "autoaccum":
            found = run_autoaccum(wl, args.cap, device)
        elif args.tool.startswith("lightning-"):
            found = run_lightning(wl, args.cap, device, args.tool.removeprefix("lightning-"))
        else:
            found = run_accelerate(wl, args.cap, device)
    except Exception as exc:
        emit(
            {
                **result,
                "status": "error",
                "reason": traceback.format_exception_only(exc)[-1].strip()[:500],
            }
        )
        traceback.print_exc()
        return 1
    emit({**result, "status": "ok", "peak_allocated": peak_bytes(device), **found})
    return 0


if __name__ == "__main__":
    sys.exit(main())
