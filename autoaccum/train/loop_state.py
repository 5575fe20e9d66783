"""An accumulator's state as a checkpoint keeps it, and putting it back: the model's and the
optimizer's full (unsharded) state keyed by parameter names, the scheduler, the GradScaler,
the plan, the probe result and the micro-batch's changes — as plain data and tensors, so a
checkpoint loads without running code (:mod:`autoaccum.train.checkpoint`)."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any

from autoaccum.plan import Plan, make_plan
from autoaccum.results import ProbeResult
from autoaccum.train import checkpoint as ckpt
from autoaccum.train import checkpoint_state
from autoaccum.train.checkpoint_codec import encode
from autoaccum.train.window import WindowTrainer

__all__ = ["put", "take"]


def take(
    acc: WindowTrainer,
    plan: Plan | None,
    probe: ProbeResult | None,
    target_batch: int,
    world_size: int,
    *,
    writer: bool = True,
) -> dict[str, Any] | None:
    """The loop's state for a checkpoint: ``acc``'s (the accumulator's window trainer), and
    the plan and probe result it trains under. Every rank must call it (FSDP2 gathers the
    shards); a rank that is not ``writer`` gets None (DDP's other ranks copy nothing)."""
    tensors = checkpoint_state.take(acc.model, acc.optimizer, writer=writer)
    if tensors is None:
        return None
    scheduler = checkpoint_state.scheduler_state(acc.scheduler)
    return {
        "target_batch": target_batch,
        "world_size": world_size,
        "device": ckpt.device_identity(acc.device),
        **tensors,
        "scheduler": scheduler,
        "scheduler_type": checkpoint_state.type_name(acc.scheduler) if scheduler else None,
        "scaler": acc.scaler.state_dict(),
        "plan": encode(plan),
        "probe": encode(probe),
        "resizer": acc.resizer.state_dict(),
    }


def put(
    acc: WindowTrainer,
    saved: ckpt.Saved,
    target_batch: int,
    world_size: int,
    rank: int,
    *,
    any_world: bool = False,
) -> tuple[Plan, ProbeResult | None] | None:
    """Put ``saved`` back into ``acc`` (the accumulator's window trainer on rank ``rank``)
    after checking all of it (target, world size unless ``any_world``, every parameter's
    name and shape, the optimizer, the scheduler, the precision): on a mismatch a
    :class:`~autoaccum.errors.ConfigError` and nothing was loaded. The plan (this rank's
    split as it was; on another world size, the saved ceiling's) and the probe result to
    train under when the device is the one they were probed on; None otherwise (the caller
    probes again)."""
    where = saved.path or "the checkpoint"
    ckpt.check_compatible(saved, target_batch, world_size, any_world=any_world)
    checkpoint_state.check_model(acc.model, saved.model, where)
    checkpoint_state.check_optimizer(
        acc.model, acc.optimizer, saved.optimizer, saved.optimizer_type, where
    )
    checkpoint_state.check_schedule(acc.scheduler, acc.scaler, saved, where)
    checkpoint_state.put(acc.model, acc.optimizer, saved)  # all checked: now load
    if acc.scheduler is not None and saved.scheduler is not None:
        acc.scheduler.load_state_dict(dict(saved.scheduler))
    acc.scaler.load_state_dict(dict(saved.scaler))
    acc.steps = saved.position.steps
    if saved.device != ckpt.device_identity(acc.device):
        return None
    acc.resizer.load_state_dict(dataclasses.asdict(saved.resizer))
    acc.resizer.learn(saved.probe)
    plan, ceiling = saved.plan, saved.plan.max_micro  # rank 0's, with every rank's split
    if saved.world_size == world_size and plan.rank != rank:  # this rank's split, as it was
        ceiling = max(plan.rank_sizes[rank]) if len(plan.rank_sizes) > rank else ceiling
    if (saved.world_size, plan.rank) != (world_size, rank):
        mine = make_plan(target_batch, ceiling, world_size, min_micro=plan.min_micro, rank=rank)
        plan = replace(mine, rank_sizes=plan.rank_sizes if saved.world_size == world_size else ())
    return plan, saved.probe
