"""Checkpoints taken at a window boundary, and the exact resume from one.

A checkpoint holds everything a run needs to continue as if it had never stopped: the model,
the optimizer, the scheduler and the GradScaler; the plan, the probe result and the
micro-batch's changes (so a resumed run does not probe again unless the device changed);
the position (epoch, windows done, optimizer steps, samples and items seen, the losses so
far); each rank's random state, both now and as it was when the epoch's order was drawn
(so the epoch's permutation is drawn again, identically); the evaluations; and the run's id.

Loading never runs code: files are read with ``torch.load(weights_only=True)`` and hold
only tensors and plain data (:mod:`~autoaccum.train.checkpoint_codec`), checked key by key
into :class:`Saved`. Resuming from a folder takes its newest readable checkpoint: a damaged
newest one is passed over with a warning naming it. The folder on disk, its ``latest``
pointer and which files a run may delete are :mod:`~autoaccum.train.checkpoint_files`'s.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from autoaccum._version import __version__
from autoaccum.errors import ConfigError
from autoaccum.plan import Plan
from autoaccum.results import ProbeResult, Resize
from autoaccum.train.callbacks import Checkpoint
from autoaccum.train.checkpoint_codec import check_loadable, decode
from autoaccum.train.checkpoint_files import read_pointer, step_files, verify
from autoaccum.train.checkpoint_random import SavedRandom

__all__ = [
    "FORMAT",
    "OptimizerState",
    "Position",
    "ResizerState",
    "Saved",
    "check_compatible",
    "device_identity",
    "latest",
    "load",
    "newest",
    "prepare",
    "read",
    "resume_from",
]

#: The checkpoint layout's version; a file of another version is refused with an error.
FORMAT = 2


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


@dataclass(frozen=True)
class OptimizerState:
    """The optimizer's full state, keyed by parameter names."""

    state: dict[str, dict[str, Any]]
    param_groups: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class ResizerState:
    """:meth:`autoaccum.train.resize.Resizer.state_dict`, checked."""

    ceiling: int | None
    current: int | None
    grow_after: int
    resizes: tuple[Resize, ...]
    oom_retries: int
    failures: dict[int, int]
    clean: int


@dataclass(frozen=True)
class Saved:
    """A checkpoint as loaded and checked: every key there, of its type."""

    format: int
    autoaccum: str  #: the version that wrote it
    run_id: str
    target_batch: int
    world_size: int
    device: dict[str, str | int]  #: the device the plan was probed on
    model: dict[str, torch.Tensor]
    optimizer: OptimizerState
    optimizer_type: str
    scheduler: dict[str, Any] | None
    scheduler_type: str | None
    scaler: dict[str, Any]
    plan: Plan
    probe: ProbeResult | None
    resizer: ResizerState
    position: Position
    random: tuple[SavedRandom, ...]  #: each rank's, in rank order
    metrics: tuple[dict[str, Any], ...]
    path: str = ""  #: where it was read from


def device_identity(device: torch.device) -> dict[str, str | int]:
    """The device a plan was probed on: a resumed run on another one probes again."""
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "total": int(props.total_memory)}
    return {"type": device.type}


def _consistent(saved: Saved) -> str | None:
    """What contradicts itself in a well-typed checkpoint, in words (None: nothing)."""
    plan, p = saved.plan, saved.position
    if saved.target_batch < 1 or saved.world_size < 1:
        return "target_batch and world_size must be ≥ 1"
    if plan.world_size != saved.world_size and not plan.tokens:
        return "the plan is for another world_size than the checkpoint"
    sizes = plan.micro_sizes
    if not 0 <= plan.rank < plan.world_size:
        return f"the plan is for rank {plan.rank} of {plan.world_size}"
    if not sizes or min(sizes) < 1 or sum(sizes) != plan.per_rank:
        return f"the plan's micro_sizes {sizes} do not add up to its target_batch"
    if (plan.micro_batch, plan.accum_iter) != (max(sizes), len(sizes)):
        return "the plan's micro_batch or accum_iter do not match its micro_sizes"
    if not 1 <= plan.min_micro <= min(sizes) or plan.max_micro < plan.micro_batch:
        return "the plan's min_micro or max_micro do not match its micro_sizes"
    if min(p.epoch, p.window, p.steps, p.samples, p.skipped, p.epochs_started, p.items) < 0:
        return "the position holds a negative count"
    if len(p.losses) != p.steps:
        return f"the position has {len(p.losses)} losses for {p.steps} steps"
    if len(saved.random) != saved.world_size:
        return f"random holds {len(saved.random)} ranks' states for {saved.world_size} ranks"
    return None


def prepare(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` (a :class:`Saved`'s fields as plain data) with its format marker, once it
    is shown to load back safely and to check out as :class:`Saved`: an error naming the key
    at save time rather than a checkpoint that cannot be resumed."""
    payload = {"format": FORMAT, "autoaccum": __version__, **payload}
    check_loadable(payload, "the checkpoint")
    try:
        contradiction = _consistent(decode(Saved, payload, ""))
    except ConfigError as err:
        raise ConfigError(f"cannot save the checkpoint: {err}") from None
    if contradiction is not None:
        raise ConfigError(f"cannot save the checkpoint: {contradiction}")
    return payload


def _unreadable(exc: Exception) -> str:
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found is not None and found.group(1).startswith("autoaccum."):
        return (
            "it was written by an older autoaccum, whose checkpoints held Python objects "
            f"({found.group(1)}) that loading would have to run code for; this version reads "
            f"only format {FORMAT}. Resume it with the version that wrote it, or start a new run"
        )
    if found is not None:
        return (
            f"it holds a Python object ({found.group(1)}) that loading would have to run code "
            "for, which autoaccum never does (nothing of it was run)"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"it is damaged, truncated or no checkpoint ({first})"


def read(path: str | os.PathLike[str]) -> Saved:
    """The checkpoint file at ``path``, loaded without running code and checked; a
    :class:`ConfigError` saying what is wrong otherwise."""
    where = Path(path)
    damaged = verify(where)
    if damaged is not None:
        raise ConfigError(
            f"{where} is not a readable autoaccum checkpoint: {damaged}. Resume from another "
            "of the folder's checkpoints (resume= the folder passes over damaged ones)"
        )
    try:
        raw = torch.load(where, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"{where} is not a readable autoaccum checkpoint: {_unreadable(exc)}"
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        writer = raw.get("autoaccum") if isinstance(raw, dict) else None
        raise ConfigError(
            f"{where} is not an autoaccum checkpoint of format {FORMAT} (written by "
            f"{f'autoaccum {writer}' if isinstance(writer, str) else 'another program'}); "
            "resume from a checkpoint this version of autoaccum wrote, or start a new run"
        )
    try:
        saved: Saved = decode(Saved, raw, "")
    except ConfigError as err:
        raise ConfigError(f"{where} is damaged or no autoaccum checkpoint: {err}") from None
    contradiction = _consistent(saved)
    if contradiction is not None:
        raise ConfigError(f"{where} is damaged or no autoaccum checkpoint: {contradiction}")
    return replace(saved, path=str(where))


def latest(directory: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint file in ``directory`` (its ``latest`` pointer's, else the highest
    step's), or None."""
    folder = Path(directory)
    pointer = read_pointer(folder)
    if pointer is not None and pointer.checkpoint is not None and pointer.checkpoint.is_file():
        return pointer.checkpoint
    files = step_files(folder)
    return files[0][1] if files else None


def newest(directory: str | os.PathLike[str]) -> Saved | None:
    """The newest readable checkpoint of the run ``directory``'s ``latest`` names (None: the
    folder holds none). Damaged ones are passed over, with a warning naming each."""
    folder = Path(directory)
    pointer = read_pointer(folder)
    order = [path for _, path in step_files(folder)]
    passed: list[str] = []
    if pointer is not None and pointer.damaged is not None:
        passed.append(pointer.damaged)
    elif pointer is not None and pointer.checkpoint is not None:
        if pointer.checkpoint.is_file():
            order = [pointer.checkpoint, *(p for p in order if p != pointer.checkpoint)]
        else:
            passed.append(f"{pointer.checkpoint} (named by latest) is missing or not a file")
    run = pointer.run_id if pointer is not None else None
    for path in order:
        try:
            saved = read(path)
        except ConfigError as err:
            passed.append(str(err))
            continue
        if run is not None and saved.run_id != run:
            passed.append(f"{path} belongs to another run than latest's")
            continue
        if passed:
            warnings.warn(
                f"resuming from {path}, the newest readable checkpoint in {folder}, passing over "
                f"what could not be used: {'; '.join(passed)}",
                UserWarning,
                stacklevel=3,
            )
        return saved
    if passed:
        raise ConfigError(f"no readable checkpoint in {folder}: {'; '.join(passed)}")
    return None


def load(path: str | os.PathLike[str]) -> Saved:
    """The checkpoint at ``path``: a file (an error when it cannot be used), or a folder (its
    newest readable checkpoint, see :func:`newest`)."""
    where = Path(path)
    if where.is_dir():
        found = newest(where)
        if found is None:
            raise ConfigError(f"no checkpoint in {where} (no step-*.pt file); check the path")
        return found
    if not where.is_file():
        raise ConfigError(f"no checkpoint at {where}: no such file or directory")
    return read(where)


def resume_from(
    resume: str | os.PathLike[str], callbacks: Sequence[Any]
) -> tuple[Saved | None, str | None]:
    """What ``fit(..., resume=)`` continues from, and what to say about it: a checkpoint file
    or folder; or ``"auto"``: the newest checkpoint of the :class:`Checkpoint` callback's
    folder, or a new run when it holds none."""
    if not (isinstance(resume, str) and resume == "auto"):
        return load(resume), None
    folders = {c.directory.resolve(): c.directory for c in callbacks if isinstance(c, Checkpoint)}
    if len(folders) != 1:
        raise ConfigError(
            "resume='auto' continues from the newest checkpoint in the Checkpoint callback's "
            "folder, but "
            + (
                "callbacks holds no Checkpoint: add one, e.g. Checkpoint('runs/ckpt', every=100), "
                if not folders
                else f"Checkpoints write to {len(folders)} folders "
                f"({', '.join(str(f) for f in folders.values())}): "
            )
            + "or name the checkpoint to resume from, resume='runs/ckpt'"
        )
    folder = next(iter(folders.values()))
    saved = newest(folder)
    if saved is None:
        return None, f"resume='auto': no checkpoint in {folder} yet, so this is a new run"
    steps = saved.position.steps
    return saved, f"resume='auto': continuing from {saved.path} (after step {steps})"


def check_compatible(
    saved: Saved, target_batch: int, world_size: int, *, any_world: bool = False
) -> None:
    """A clear error when the checkpoint was taken for another target batch, or, unless
    ``any_world`` (the windows are the same on any number of ranks), another world size:
    its windows, or each rank's share of them, would not be the ones of this run."""
    where = saved.path or "the checkpoint"
    if saved.target_batch != target_batch:
        raise ConfigError(
            f"{where} was taken with target_batch={saved.target_batch} at step "
            f"{saved.position.steps}, where this run's target is {target_batch}: the windows "
            f"it counted would not be this run's. Resume with the target (or schedule) it was "
            "taken with, or start a new run without resume="
        )
    if saved.world_size != world_size and not any_world:
        raise ConfigError(
            f"{where} was taken on {saved.world_size} ranks, this run has {world_size}, and its "
            "data is each rank's own (a list or iterable of batches per rank, or a "
            "DistributedSampler): each rank's share would differ, so the resume could not be "
            f"exact. Resume on {saved.world_size} ranks, pass a DataLoader without a "
            "DistributedSampler (its windows are the same on any number of ranks), or start a "
            "new run without resume="
        )
