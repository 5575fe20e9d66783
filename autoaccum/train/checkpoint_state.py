"""The training state in a checkpoint: the model's and the optimizer's, taken whole
(unsharded, on the CPU) and keyed by parameter names; checked against the run's model,
optimizer, scheduler and GradScaler before anything is loaded; then put back.

A plain or DDP model is read and written with its own ``state_dict``/``load_state_dict``
and the optimizer's (its state keyed by parameter names instead of positions), which
works for every optimizer in ``torch.optim``, stateless ones included; an FSDP2 model goes
through ``torch.distributed.checkpoint``'s full-state helpers (imported only then), so both
give the same file and a checkpoint of one can be resumed on the other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from autoaccum import distributed as D
from autoaccum.errors import ConfigError
from autoaccum.train.checkpoint_codec import check_like, describe

__all__ = [
    "check_model",
    "check_optimizer",
    "check_schedule",
    "load_optimizer",
    "put",
    "scheduler_state",
    "take",
    "type_name",
]

_WRAPPERS = {"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}
_SHOWN = 5  #: names listed in a message


def type_name(obj: object) -> str:
    """``obj``'s class as ``module.QualName``, what a checkpoint records of it."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP, DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(
            inner := getattr(model, "_orig_mod", None), nn.Module
        ):
            model = inner
        else:
            return model


def _fqn(name: str) -> str:
    """A state key without the wrappers' parts (as ``torch.distributed.checkpoint`` names it)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPERS)


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Each parameter group's parameters, by name."""
    names: dict[int, str] = {}
    for name, param in _unwrap(model).named_parameters(remove_duplicate=False):
        names.setdefault(id(param), _fqn(name))
    groups = []
    for g, group in enumerate(optimizer.param_groups):
        row = []
        for i, param in enumerate(group["params"]):
            if id(param) not in names:
                raise ConfigError(
                    f"parameter {i} of the optimizer's group {g} (shape {tuple(param.shape)}) "
                    "is not one of the model's parameters, so a checkpoint (which keys the "
                    "state by parameter names) cannot save or restore it. Make it a parameter "
                    "of the model (e.g. of a submodule)"
                )
            row.append(names[id(param)])
        groups.append(row)
    return groups


def _cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def take(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, writer: bool = True
) -> dict[str, Any] | None:
    """The model's and the optimizer's full state on the CPU, keyed by parameter names, for
    the rank that writes it (``writer``; None on the others). Every rank must call it: FSDP2
    gathers the shards; DDP's full state is on every rank, so the others copy nothing."""
    if not writer and not D.is_fsdp2(model):
        return None
    if D.is_fsdp2(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    else:
        model_state = {_fqn(k): _cpu(v) for k, v in _unwrap(model).state_dict().items()}
        native = optimizer.state_dict()
        names = _param_names(model, optimizer)
        index = {
            i: name
            for group, row in zip(native["param_groups"], names, strict=True)
            for i, name in zip(group["params"], row, strict=True)
        }
        optimizer_state = {
            "state": {
                index[i]: {k: _cpu(v) for k, v in s.items()} for i, s in native["state"].items()
            },
            "param_groups": [
                {**g, "params": [index[i] for i in g["params"]]} for g in native["param_groups"]
            ],
        }
    if not writer:
        return None
    return {
        "model": model_state,
        "optimizer": optimizer_state,
        "optimizer_type": type_name(optimizer),
    }


# --------------------------------------------------------------------------- checking


def check_model(model: nn.Module, saved: Mapping[str, torch.Tensor], where: str) -> None:
    """A :class:`ConfigError` naming every parameter and buffer that differs between the
    checkpoint and ``model`` (missing, unexpected, another shape or dtype)."""
    live = {_fqn(k): v for k, v in _unwrap(model).state_dict(keep_vars=True).items()}
    missing = [k for k in live if k not in saved]
    unexpected = [k for k in saved if k not in live]
    shapes, dtypes = [], []
    for key in (k for k in live if k in saved and isinstance(live[k], torch.Tensor)):
        mine, theirs = live[key], saved[key]
        if tuple(theirs.shape) != tuple(mine.shape):
            shapes.append(f"{key} {tuple(theirs.shape)} vs {tuple(mine.shape)}")
        elif theirs.dtype != mine.dtype:
            dtypes.append(f"{key} {theirs.dtype} vs {mine.dtype}")
    parts = [
        f"missing from the checkpoint: {_listed(missing)}" if missing else "",
        f"not in the model: {_listed(unexpected)}" if unexpected else "",
        f"shapes differ (checkpoint vs model): {_listed(shapes)}" if shapes else "",
        f"dtypes differ (checkpoint vs model): {_listed(dtypes)}" if dtypes else "",
    ]
    if any(parts):
        raise ConfigError(
            f"{where} does not fit this model — {'; '.join(p for p in parts if p)}. Nothing "
            "was loaded. Resume into the model the checkpoint was taken from (the same "
            "layers, shapes and dtype), or start a new run without resume="
        )


def check_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved: Any, saved_type: str, where: str
) -> None:
    """A :class:`ConfigError` when the checkpoint's optimizer is of another type or holds other
    parameter groups than ``optimizer``."""
    if saved_type != type_name(optimizer):
        raise ConfigError(
            f"{where} holds the state of a {saved_type} optimizer, this run's is a "
            f"{type_name(optimizer)}: nothing was loaded. Resume with the optimizer type it "
            "was taken with (and the same parameter groups), or start a new run without resume="
        )
    names, groups = _param_names(model, optimizer), saved.param_groups
    if len(groups) != len(names):
        raise ConfigError(
            f"{where}'s optimizer has {len(groups)} parameter group(s), this run's has "
            f"{len(names)}: nothing was loaded. Build the optimizer with the same groups"
        )
    for g, (group, row) in enumerate(zip(groups, names, strict=True)):
        params = group.get("params")
        if not isinstance(params, (list, tuple)) or not all(isinstance(p, str) for p in params):
            raise ConfigError(
                f"{where}: optimizer.param_groups[{g}]['params'] is {describe(params)}, "
                "expected a list of parameter names"
            )
        missing = [n for n in row if n not in params]
        unexpected = [n for n in params if n not in row]
        if missing or unexpected or len(params) != len(row):
            raise ConfigError(
                f"{where}'s optimizer group {g} holds other parameters than this run's "
                f"(only in this run: {_listed(missing) or 'none'}; only in the checkpoint: "
                f"{_listed(unexpected) or 'none'}): nothing was loaded. Build the optimizer "
                "over the same parameters, in the same groups"
            )
        live = {k: v for k, v in optimizer.param_groups[g].items() if k != "params"}
        check_like(
            {k: v for k, v in group.items() if k != "params"}, live, f"optimizer.param_groups[{g}]"
        )
    known = {n for row in names for n in row}
    stray = [k for k in saved.state if k not in known]
    if stray:
        raise ConfigError(
            f"{where}'s optimizer state is for parameters this run's optimizer does not hold: "
            f"{_listed(stray)}. Nothing was loaded"
        )


def scheduler_state(scheduler: Any) -> dict[str, Any] | None:
    """The scheduler's ``state_dict()`` (None without a scheduler)."""
    if scheduler is None:
        return None
    state_dict = getattr(scheduler, "state_dict", None)
    if not callable(state_dict) or not callable(getattr(scheduler, "load_state_dict", None)):
        raise ConfigError(
            f"the scheduler ({type(scheduler).__name__}) has no state_dict()/load_state_dict(), "
            "so a checkpoint cannot save it; use a torch.optim.lr_scheduler scheduler or give "
            "yours those two methods"
        )
    state: dict[str, Any] = state_dict()
    return state


def check_schedule(scheduler: Any, scaler: Any, saved: Any, where: str) -> None:
    """A :class:`ConfigError` when the checkpoint's scheduler or GradScaler state does not
    match this run's (one without the other, another type, values of another kind)."""
    if (saved.scheduler is None) != (scheduler is None):
        theirs = saved.scheduler_type or "no scheduler"
        mine = type_name(scheduler) if scheduler is not None else "none"
        raise ConfigError(
            f"{where} was taken with {theirs}, this run has {mine}: nothing was loaded. Pass "
            "the scheduler the run was taken with (its state is restored), or start a new run"
        )
    if scheduler is not None:
        if saved.scheduler_type != type_name(scheduler):
            raise ConfigError(
                f"{where} holds a {saved.scheduler_type} scheduler's state, this run's is a "
                f"{type_name(scheduler)}: nothing was loaded. Pass the same scheduler type"
            )
        check_like(saved.scheduler, scheduler_state(scheduler), "scheduler")
    live = scaler.state_dict()
    if bool(saved.scaler) != bool(live):
        theirs, mine = ("with", "without") if saved.scaler else ("without", "with")
        raise ConfigError(
            f"{where} was taken {theirs} a GradScaler (precision 'fp16'), this run is {mine} "
            "one: nothing was loaded. Pass the precision the run was taken with"
        )
    check_like(saved.scaler, live, "scaler")


# --------------------------------------------------------------------------- loading


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """``optimizer.load_state_dict`` of the checkpoint's state, matched by parameter names.

    torch casts every floating state tensor but ``step`` to its parameter's dtype on loading;
    a state kept in another dtype on purpose (NAdam's float32 ``mu_product`` beside float64
    parameters) is put back in its own, so that the resumed steps are the same to the bit.
    """
    native: dict[str, Any] = {"state": {}, "param_groups": []}
    params: list[tuple[torch.Tensor, str]] = []
    for group, row, live in zip(
        saved.param_groups, _param_names(model, optimizer), optimizer.param_groups, strict=True
    ):
        ids = []
        for name, param in zip(row, live["params"], strict=True):
            if name in saved.state:
                native["state"][len(params)] = saved.state[name]
            ids.append(len(params))
            params.append((param, name))
        native["param_groups"].append({**group, "params": ids})
    optimizer.load_state_dict(native)
    for param, name in params:
        for key, value in saved.state.get(name, {}).items():
            loaded = optimizer.state[param].get(key)
            kept = isinstance(value, torch.Tensor) and isinstance(loaded, torch.Tensor)
            if kept and loaded.dtype != value.dtype:
                optimizer.state[param][key] = value.to(device=loaded.device)


def put(model: nn.Module, optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """Load the checkpoint's model and optimizer state (checked first with
    :func:`check_model` and :func:`check_optimizer`); FSDP2 shards it again."""
    if D.is_fsdp2(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, dict(saved.model), options=options)
        if any(saved.optimizer.state.values()):
            state = {
                "state": saved.optimizer.state,
                "param_groups": list(saved.optimizer.param_groups),
            }
            set_optimizer_state_dict(model, optimizer, state, options=options)
            return
    else:
        module = _unwrap(model)
        keys = {_fqn(k): k for k in module.state_dict(keep_vars=True)}
        module.load_state_dict({keys[k]: v for k, v in saved.model.items()})
    load_optimizer(model, optimizer, saved.optimizer)
