"""Rank helpers. Every function is a no-op (or the identity) without a process group."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from autoaccum.buckets import BUCKET_BYTES, all_reduce_mean, broadcast_from, reserve
from autoaccum.errors import ConfigError, DistributedError, check_count
from autoaccum.rendezvous import join

__all__ = [
    "SYNC_MODES",
    "DistInfo",
    "broadcast_buffers",
    "check_sync",
    "current",
    "drop_unsynced_grads",
    "gradient_sync",
    "init_from_env",
    "is_fsdp2",
    "local_cuda_index",
    "local_tensor",
    "prepare_reduction",
    "reduce_gradients",
    "resolve_sync",
    "select_device",
    "wrap_model",
]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: torch's own default for a group's collectives
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)

#: How a multi-rank window reduces its gradients: ``"deferred"`` (one all-reduce once every
#: rank's micro-steps succeeded) or ``"overlap"`` (DDP's or FSDP2's own, in the last
#: micro-step's backward); ``"auto"``: deferred but for FSDP2.
SYNC_MODES = ("auto", "deferred", "overlap")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, and the collective's tensor device."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """The device of tensors handed to collectives (NCCL needs CUDA tensors).

        CUDA's current device, which :func:`select_device` (called by ``fit``) makes
        the training device of this rank.
        """
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def _torchrun_env() -> bool:
    return all(name in os.environ for name in _TORCHRUN_VARS)


def local_cuda_index() -> int:
    """This process's CUDA device under a launcher: ``LOCAL_RANK``.

    When every process sees a single GPU (``CUDA_VISIBLE_DEVICES`` set per process,
    as some schedulers do) that GPU is 0 whatever ``LOCAL_RANK`` says. Without
    ``LOCAL_RANK`` (a process group the caller initialised) CUDA's current device,
    i.e. whatever the caller passed to ``torch.cuda.set_device``.
    """
    count = torch.cuda.device_count()
    local = os.environ.get("LOCAL_RANK")
    if local is None:
        return torch.cuda.current_device()
    if count == 1:
        return 0
    index = int(local)
    if index >= count:
        raise DistributedError(
            f"LOCAL_RANK is {index} but this process sees {count} CUDA devices; launch at most "
            f"{count} processes per node (torchrun --nproc_per_node={count}), or pass device= "
            "to autoaccum.fit() explicitly"
        )
    return index


def select_device(device: torch.device | str | None, info: DistInfo) -> torch.device:
    """The device this rank trains on.

    ``None`` means this rank's GPU (:func:`local_cuda_index` in a distributed run, the
    current device otherwise), or the CPU without CUDA; a bare ``"cuda"`` gets the
    same index. Under NCCL the device is also made CUDA's current device, so that
    collectives (:attr:`DistInfo.comm_device`) and DDP use this rank's GPU.
    """
    if device is not None:
        dev = torch.device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda")
    else:
        return torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        index = local_cuda_index() if info.active else torch.cuda.current_device()
        dev = torch.device("cuda", index)
    if info.backend == "nccl" and dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def init_from_env(
    device_type: str | None = None, *, timeout: datetime.timedelta | None = None
) -> bool:
    """Initialise the default process group from torchrun's variables; True if it did.

    Nothing happens when a group already exists or the variables are absent. The
    backend is NCCL for CUDA devices, gloo otherwise; ``timeout`` bounds its collectives
    and how long a rank waits for the others to arrive. The group is kept for the rest of
    the process and destroyed at exit; a rank that fails to join stops every rank within
    seconds (:mod:`autoaccum.rendezvous`).
    """
    if not dist.is_available() or dist.is_initialized() or not _torchrun_env():
        return False
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_cuda_index())
    join(backend, timeout if timeout is not None else DEFAULT_TIMEOUT)
    return True


def current() -> DistInfo:
    """This process's rank and world size; rank 0 of 1 without a process group."""
    if not dist.is_available() or not dist.is_initialized():
        return DistInfo()
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        backend=str(dist.get_backend()),
    )


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a rank really holds (the local shard of an FSDP2 DTensor)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if hasattr(m, "set_requires_gradient_sync") and hasattr(m, "reshard")
    ]


def is_fsdp2(model: nn.Module) -> bool:
    """True for a module sharded with FSDP2's ``fully_shard`` (itself or a submodule)."""
    return bool(_fsdp2_modules(model))


def fill_sharded_grads(model: nn.Module) -> None:
    """Give FSDP2's sharded parameters zero gradients where they have none.

    Probe trials never reduce-scatter (a collective could hang when one rank runs out of
    memory), so the sharded parameters get no gradient and a trial's optimizer step would
    create no optimizer state. Zero local shards cost what training's reduced gradients
    cost and let the step allocate the state training will hold; no collective runs.
    """
    if not is_fsdp2(model):
        return
    for param in model.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)


def drop_unsynced_grads(model: nn.Module) -> None:
    """Forget the gradients FSDP2 accumulates, unsharded, under ``gradient_sync(False)``.

    FSDP2 keeps them on its unsharded parameters until the next backward that
    reduce-scatters, which adds them in; ``zero_grad()`` only reaches the sharded
    parameters. Used after probe trials, which never reduce. torch has no public
    call for this, so FSDP2's private state is reached defensively.
    """
    for module in _fsdp2_modules(model):
        get_state = getattr(module, "_get_fsdp_state", None)
        if not callable(get_state):
            continue
        state = get_state()
        groups = getattr(state, "_fsdp_param_groups", None)  # torch ≥ 2.8
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        for group in groups:
            for param in getattr(group, "fsdp_params", ()):
                if hasattr(param, "unsharded_accumulated_grad"):
                    param.unsharded_accumulated_grad = None
                unsharded = getattr(param, "_unsharded_param", None)
                if unsharded is not None:
                    unsharded.grad = None


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP-wrap a plain model for a multi-rank run; DDP and FSDP2 models are used as they are."""
    if not info.active:
        return model
    if isinstance(model, nn.parallel.DistributedDataParallel) or is_fsdp2(model):
        return model
    device_ids = (
        [device.index if device.index is not None else 0] if device.type == "cuda" else None
    )
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Run a micro-step with or without the gradient all-reduce of DDP / FSDP2.

    All micro-steps of a window but the last run with ``enabled=False``, so a window
    costs exactly one gradient reduction. A plain module ignores this.
    """
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif fsdp := _fsdp2_modules(model):
        # Each fully_shard-ed module on its own (recurse off): this also covers a model
        # whose root module is not sharded itself.
        for module in fsdp:
            module.set_requires_gradient_sync(False, recurse=False)  # type: ignore[operator]
        try:
            yield
        finally:
            for module in fsdp:
                module.set_requires_gradient_sync(True, recurse=False)  # type: ignore[operator]
    else:
        yield


def reduce_gradients(
    module: nn.Module, info: DistInfo, *, bucket_bytes: int = BUCKET_BYTES
) -> None:
    """:func:`prepare_reduction`, then the reduction."""
    prepare_reduction(module, info, bucket_bytes=bucket_bytes)()


def prepare_reduction(
    module: nn.Module, info: DistInfo, *, bucket_bytes: int = BUCKET_BYTES
) -> Callable[[], None]:
    """The average of every trainable parameter's gradient over the ranks, made ready: the
    returned call averages them in place, the way DDP's reduction would (a parameter without a
    gradient on a rank counts as zeros there).

    Used when a window's micro-steps all ran without gradient sync, and called once the ranks
    have agreed that every one of them succeeded: no rank can be left inside a half-done
    reduction. What it allocates (the zero gradients of parameters that had none, the buckets'
    buffers) is taken here, before the ranks agree, so that running out of memory for it stops
    every rank instead of leaving the others inside a collective. The gradients go in flat
    buckets of about ``bucket_bytes`` per dtype (:mod:`autoaccum.buckets`; ``0``: one
    all-reduce per parameter), all issued together and waited for together; the buckets are
    freed once copied back.
    """
    check_count("bucket_bytes", bucket_bytes, minimum=0)
    if not info.active or info.world_size == 1:
        return lambda: None
    grads = []
    for param in module.parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    buffers = reserve(grads, bucket_bytes)
    return lambda: all_reduce_mean(grads, info.world_size, bucket_bytes, buffers=buffers)


def broadcast_buffers(
    module: nn.Module, info: DistInfo, *, bucket_bytes: int = BUCKET_BYTES
) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), as DDP's ``broadcast_buffers``
    does before each forward; called once per window, after the window succeeded. The
    buffers go in flat buckets per dtype, one broadcast each (``bucket_bytes=0``: one per
    buffer)."""
    check_count("bucket_bytes", bucket_bytes, minimum=0)
    if not info.active or info.world_size == 1:
        return
    broadcast_from(list(module.buffers()), 0, bucket_bytes)


def check_sync(sync: object) -> str:
    """``sync`` when it is one of :data:`SYNC_MODES`, else a :class:`ConfigError`."""
    if sync not in SYNC_MODES:
        raise ConfigError(f"sync must be one of {', '.join(SYNC_MODES)}; got {sync!r}")
    return str(sync)


def resolve_sync(sync: str, model: nn.Module, info: DistInfo) -> str:
    """``"deferred"`` or ``"overlap"`` for ``model`` on these ranks (see :data:`SYNC_MODES`)."""
    check_sync(sync)
    if not info.active or info.world_size == 1:
        return "deferred"  # one rank: nothing to reduce, no collective in a micro-step
    if is_fsdp2(model):
        if sync == "deferred":
            raise ConfigError(
                "sync='deferred' is not available with FSDP2: its gradients are reduce-scattered "
                "by FSDP2 itself in the last micro-step; use sync='auto' or 'overlap'"
            )
        return "overlap"
    return "deferred" if sync == "auto" else sync
