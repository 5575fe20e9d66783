"""The peers' batch-size finders, each on one workload in this process.

* Lightning ``Tuner.scale_batch_size`` (power and binsearch), ``steps_per_trial=3``, on a
  minimal LightningModule with a ``batch_size`` attribute whose ``train_dataloader()``
  reads a map-style dataset. Besides its answer, each trial's outcome is recorded, so the
  largest size it trained *before* its 5 % binsearch margin (``max_batch``) is known.
* Accelerate ``find_executable_batch_size`` from ``workload.upper``, each trial 3 hand
  steps under autocast.
* MosaicML Composer ``Trainer(device_train_microbatch_size="auto")``: a batch of
  ``workload.upper`` samples, halved on out-of-memory errors; 3 optimizer steps. Composer
  is optional and not installed by any requirements file; without it the tool is skipped.

Each returns ``{micro_batch, max_batch?, seconds, trials, sizes}``; ``seconds`` is the
search call alone, the model already on the device.
"""

from __future__ import annotations

import importlib
import logging
import tempfile
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import peer_module, sync
from benchmarks.loops import hand_window
from benchmarks.workloads import Workload, batch_len, build

__all__ = ["STEPS_PER_TRIAL", "run_accelerate", "run_composer", "run_lightning"]

STEPS_PER_TRIAL = 3  #: the peers' trials, as in the issue's reference runs


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


def _loader(wl: Workload, batch_size: int) -> DataLoader[Any]:
    """The peers' data: the workload's own dataset (padded per batch), else synthetic samples."""
    if wl.dataset is not None:
        return wl.loader(batch_size)
    return DataLoader(SyntheticSamples(wl), batch_size=batch_size, shuffle=False)


def run_lightning(wl: Workload, cap: str, device: torch.device, mode: str) -> dict[str, Any]:
    module = peer_module("lightning")
    if module is None:
        raise RuntimeError("lightning is not installed")
    pl = importlib.import_module("lightning.pytorch" if module == "lightning" else module)
    tuner_mod = importlib.import_module(f"{pl.__name__}.tuner")
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    trials: list[list[int]] = []  # [size, steps completed]

    class LitWorkload(pl.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model
            self.batch_size = 2

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if batch_idx == 0:
                trials.append([batch_len(batch), 0])
            return wl.loss_fn(self.model, batch)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            trials[-1][1] += 1

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return wl.make_optimizer(self.model)

        def train_dataloader(self) -> DataLoader[Any]:
            return _loader(wl, self.batch_size)

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
    passed = [size for size, done in trials if done >= STEPS_PER_TRIAL]
    return {
        "micro_batch": int(found) if found is not None else None,
        "max_batch": max(passed, default=None),  # before binsearch's margin
        "seconds": seconds,
        "trials": len(trials),
        "sizes": [size for size, _ in trials],
        "fits": [done >= STEPS_PER_TRIAL for _, done in trials],
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
        stream = wl.stream(batch_size, device, 0)
        for _ in range(STEPS_PER_TRIAL):
            hand_window(model, optimizer, wl.loss_fn, [next(stream)], precision, device)
        sync(device)
        return batch_size

    sync(device)
    start = time.perf_counter()
    found = trial()
    seconds = time.perf_counter() - start
    return {"micro_batch": int(found), "seconds": seconds, "trials": len(sizes), "sizes": sizes}


def run_composer(wl: Workload, cap: str, device: torch.device) -> dict[str, Any]:
    """Composer's automatic micro-batching: it starts at the whole device batch
    (``workload.upper``) and halves the micro-batch on every out-of-memory error; the
    micro-batch it trains with at the end is its answer. Not tested here (Composer is
    not installed in CI); it runs only where ``import composer`` works, on a GPU."""
    if device.type != "cuda":
        raise RuntimeError("Composer's automatic micro-batching needs a CUDA device")
    from composer import Trainer
    from composer.models import ComposerModel

    class Wrapped(ComposerModel):  # type: ignore[misc]
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, batch: Any) -> Any:
            return batch  # the loss runs the model: one function for every workload

        def loss(self, outputs: Any, batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            return wl.loss_fn(self.module, batch)

    wrapped = Wrapped(build(wl, cap, device))
    optimizer = wl.make_optimizer(wrapped.module)
    trainer = Trainer(
        model=wrapped,
        train_dataloader=_loader(wl, wl.upper),
        optimizers=optimizer,
        max_duration=f"{STEPS_PER_TRIAL}ba",
        device="gpu",
        precision="amp_bf16",
        device_train_microbatch_size="auto",
        progress_bar=False,
        log_to_console=False,
        save_folder=None,
    )
    sync(device)
    start = time.perf_counter()
    trainer.fit()
    sync(device)
    seconds = time.perf_counter() - start
    micro = int(trainer.state.device_train_microbatch_size)  # where the halving ended
    return {"micro_batch": micro, "seconds": seconds, "trials": None, "sizes": [micro]}
