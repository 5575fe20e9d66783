"""Checkpoints taken at a window boundary, and the exact resume from one.

A checkpoint holds everything a run needs to continue as if it had never stopped: the model,
the optimizer, the scheduler and the GradScaler; the plan, the probe result and the
micro-batch's changes (so a resumed run does not probe again unless the device changed);
the position (epoch, windows done, optimizer steps, samples and items seen, the losses so
far); and each rank's random state, both now and as it was when the epoch's order was drawn
(so the epoch's permutation is drawn again, identically). State dicts are taken with
``torch.distributed.checkpoint``'s full-state helpers, so DDP and FSDP2 models give the
same, unsharded file.

Files are written atomically: to a temporary name, flushed to disk, then renamed, and a
``latest`` pointer is renamed into place after them; a crash mid-write never leaves a
corrupt checkpoint or pointer. The last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from autoaccum._version import __version__
from autoaccum.errors import ConfigError
from autoaccum.probing.state import RngState

__all__ = ["FORMAT", "Position", "latest", "load", "save"]

#: The checkpoint layout's version; a file of another version is refused with an error.
FORMAT = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")
_LATEST = "latest"


@dataclass(frozen=True)
class Position:
    """Where a run stands at a window boundary."""

    epoch: int  #: the epoch in progress
    window: int  #: windows of that epoch done (the next one's index)
    steps: int  #: optimizer steps taken (skipped fp16 steps included)
    samples: int  #: samples trained on, all ranks
    items: float  #: items (count_fn) trained on, all ranks
    skipped: int  #: fp16 steps the GradScaler skipped
    epochs_started: int
    losses: tuple[float, ...]  #: every window loss so far


def model_and_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full (unsharded) state dicts of the model and the optimizer, on the CPU. Every rank
    must call it (FSDP2 gathers the shards)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return {"model": model_sd, "optimizer": optim_sd}


def load_model_and_optimizer(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, payload: dict[str, Any]
) -> None:
    """Put the checkpoint's model and optimizer state back (sharding it again for FSDP2)."""
    set_state_dict(
        model,
        optimizer,
        model_state_dict=payload["model"],
        optim_state_dict=payload["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )


def random_state(epoch_draw: object | None) -> dict[str, Any]:
    """This rank's random state now, and the state its current epoch's order was drawn from."""
    return {"now": RngState.capture(), "epoch_draw": epoch_draw}


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the rename is what we have
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_directory(path.parent)


def save(payload: dict[str, Any], directory: str | os.PathLike[str], keep: int) -> Path:
    """Write ``payload`` as ``directory/step-NNNNNNNN.pt``, point ``latest`` at it, and keep
    the newest ``keep`` checkpoints; atomically (see the module's doc)."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{payload['position'].steps:08d}.pt"
    _write_atomically(path, lambda handle: torch.save(payload, handle))
    _write_atomically(folder / _LATEST, lambda handle: handle.write(path.name.encode()))
    steps = sorted(
        (int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) is not None
    )
    for _, old in steps[:-keep]:
        old.unlink(missing_ok=True)
    for stale in folder.glob(".*.tmp-*"):  # what a crash mid-write left behind
        if stale.name != f".{path.name}.tmp-{os.getpid()}":
            stale.unlink(missing_ok=True)
    return path


def latest(directory: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint in ``directory`` (its ``latest`` pointer), or None."""
    folder = Path(directory)
    pointer = folder / _LATEST
    if pointer.is_file():
        named = folder / pointer.read_text().strip()
        if named.is_file():
            return named
    steps = sorted(
        (int(m.group(1)), p) for p in folder.glob("step-*.pt") if (m := _NAME.match(p.name))
    )
    return steps[-1][1] if steps else None


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint at ``path`` (a file, or a directory: its newest checkpoint)."""
    where = Path(path)
    if where.is_dir():
        found = latest(where)
        if found is None:
            raise ConfigError(f"no checkpoint in {where} (no step-*.pt file); check the path")
        where = found
    if not where.is_file():
        raise ConfigError(f"no checkpoint at {where}: no such file or directory")
    try:
        payload: dict[str, Any] = torch.load(where, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ConfigError(f"{where} is not a readable autoaccum checkpoint: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        writer = payload.get("autoaccum") if isinstance(payload, dict) else None
        raise ConfigError(
            f"{where} is not an autoaccum checkpoint of format {FORMAT} (written by "
            f"{f'autoaccum {writer}' if writer else 'another program'}); resume from a "
            "checkpoint this version of autoaccum wrote"
        )
    payload["path"] = str(where)
    return payload


def check_compatible(payload: dict[str, Any], target_batch: int, world_size: int) -> None:
    """A clear error when the checkpoint was taken for another target batch or world size:
    its windows, and each rank's share of them, would not be the ones of this run."""
    where = payload.get("path", "the checkpoint")
    if payload["target_batch"] != target_batch:
        raise ConfigError(
            f"{where} was taken with target_batch={payload['target_batch']}, this run asks for "
            f"{target_batch}: the windows it counted would not be this run's. Resume with "
            f"target_batch={payload['target_batch']}, or start a new run without resume="
        )
    if payload["world_size"] != world_size:
        raise ConfigError(
            f"{where} was taken on {payload['world_size']} ranks, this run has {world_size}: "
            "each rank's share of the data would differ, so the resume could not be exact. "
            f"Resume on {payload['world_size']} ranks, or start a new run without resume="
        )


def header(target_batch: int, world_size: int, device: torch.device) -> dict[str, Any]:
    """What identifies the run a checkpoint belongs to."""
    return {
        "format": FORMAT,
        "autoaccum": __version__,
        "target_batch": target_batch,
        "world_size": world_size,
        "device": device_identity(device),
    }


def device_identity(device: torch.device) -> dict[str, Any]:
    """The device a plan was probed on: a resumed run on another one probes again."""
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "total": int(props.total_memory)}
    return {"type": device.type}
