"""The ``autoaccum`` command (also ``python -m autoaccum``).

Subcommands::

    autoaccum report [--device D] [--json]        this machine's memory
    autoaccum probe MODULE:FACTORY --target-batch N [--device D] [--precision P]
                    [--margin F] [--json]        probe a model, plan, explain the memory
    autoaccum demo [...]                          the bundled demo (see ``autoaccum demo -h``)

Exit codes: 0 success; 1 an :class:`~autoaccum.errors.AutoAccumError` (printed as
``error: <message>``, no traceback); 2 a usage error (bad arguments, a MODULE:FACTORY
that cannot be imported or found, a factory that breaks the contract).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from autoaccum.errors import AutoAccumError

__all__ = ["FACTORY_CONTRACT", "build_parser", "load_factory", "main"]

FACTORY_CONTRACT = """\
FACTORY is called with no arguments and returns

    dict(model=..., batch=..., loss_fn=..., optimizer=...)

or the tuple (model, batch[, loss_fn[, optimizer]]):

  model      a torch.nn.Module (on any device: the command moves it to --device)
  batch      a sample batch of real samples (any number ≥ 1; a tensor, tuple, list or
             dict of tensors along dim 0); trials tile it to each size tried
  loss_fn    optional: loss_fn(model, batch) -> mean loss (a scalar tensor); default
             autoaccum.losses.default_loss (a dict batch is passed as keyword arguments
             and the output's .loss used; an (inputs, integer targets) pair gets
             cross-entropy)
  optimizer  optional: a torch.optim.Optimizer over model.parameters(); default
             torch.optim.AdamW(model.parameters()) built after the move

MODULE is imported from sys.path and the current directory (a dotted name), or is a
path to a .py file, e.g. my_models:make or ./train.py:make."""

_FACTORY_KEYS = ("model", "batch", "loss_fn", "optimizer")


class UsageError(Exception):
    """A command line that cannot run as written: exit code 2."""


# --------------------------------------------------------------------------- factories


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import(module_name: str) -> ModuleType:
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise UsageError(f"no such file: {module_name}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise UsageError(f"cannot import {module_name} as a Python module")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    with _cwd_on_path():
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing == module_name or module_name.startswith(missing + "."):
                raise UsageError(
                    f"no module named {module_name!r} (searched sys.path and the current "
                    f"directory {os.getcwd()})"
                ) from None
            raise  # the module exists but imports something missing: show where


def load_factory(spec: str) -> Callable[[], Any]:
    """The callable named by ``MODULE:FACTORY``; :class:`UsageError` when it is not there."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(
            f"expected MODULE:FACTORY (e.g. my_models:make or ./train.py:make), got {spec!r}"
        )
    module = _import(module_name)
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UsageError(f"{module_name} has no attribute {attr!r} (from {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"{spec} is a {type(target).__name__}, not a callable factory")
    return target  # type: ignore[no-any-return]


@dataclass
class _Made:
    model: Any
    batch: Any
    loss_fn: Any = None
    optimizer: Any = None


def _unpack(made: object, spec: str) -> _Made:
    from torch import nn

    if isinstance(made, Mapping):
        unknown = sorted(str(k) for k in made if k not in _FACTORY_KEYS)
        if unknown:
            raise UsageError(
                f"{spec}() returned unknown keys {unknown}; the keys are {', '.join(_FACTORY_KEYS)}"
            )
        missing = [k for k in ("model", "batch") if k not in made]
        if missing:
            raise UsageError(f"{spec}() returned a dict without {' and '.join(missing)}")
        result = _Made(**{str(k): v for k, v in made.items()})
    elif isinstance(made, (tuple, list)) and 2 <= len(made) <= 4:
        result = _Made(*made)
    else:
        raise UsageError(
            f"{spec}() returned {type(made).__name__}; it must return "
            "dict(model=..., batch=..., loss_fn=..., optimizer=...) or (model, batch[, loss_fn"
            "[, optimizer]])"
        )
    if not isinstance(result.model, nn.Module):
        raise UsageError(
            f"{spec}(): model must be a torch.nn.Module, got {type(result.model).__name__}"
        )
    return result


# --------------------------------------------------------------------------- commands


def _print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _device(name: str | None) -> Any:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"bad --device {name!r}: {exc}") from None


def _cmd_report(args: argparse.Namespace) -> int:
    from autoaccum.memory import memory_report

    device = _device(args.device) if args.device is not None else None
    report = memory_report(device)
    if args.json:
        _print_json(report.to_dict())
    else:
        from autoaccum.report import print_report

        print_report(report)
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    import torch

    from autoaccum.breakdown import breakdown
    from autoaccum.losses import default_loss
    from autoaccum.memory import memory_report
    from autoaccum.plan import make_plan
    from autoaccum.probe import probe

    factory = load_factory(args.factory)
    made = _unpack(factory(), args.factory)
    dev = _device(args.device)
    model = made.model.to(dev)
    optimizer = (
        made.optimizer if made.optimizer is not None else torch.optim.AdamW(model.parameters())
    )
    loss_fn = made.loss_fn if made.loss_fn is not None else default_loss
    result = probe(
        model,
        made.batch,
        loss_fn=loss_fn,
        optimizer=optimizer,
        upper=args.target_batch,
        precision=args.precision,
        margin=args.margin,
        device=dev,
    )
    plan = make_plan(args.target_batch, result.micro_batch)
    report = memory_report(dev)
    # the probe measured the fixed memory while its trials' optimizer state existed; the
    # optimizer is back to empty now, so a footprint taken here would miss that state
    explained = breakdown(result, plan, None, report)
    if args.json:
        _print_json(
            {
                "probe": result.to_dict(),
                "plan": plan.to_dict(),
                "breakdown": explained.to_dict(),
                "memory": report.to_dict(),
            }
        )
        return 0
    from autoaccum.report import print_report

    for obj in (result, plan, explained):
        print_report(obj)
    return 0


def _load_demo() -> ModuleType:
    """``autoaccum.demo``, imported only when the demo is the command being run."""
    try:
        return importlib.import_module("autoaccum.demo")
    except Exception as exc:  # not installed, or it imports something missing
        raise UsageError(f"the demo is not available: {type(exc).__name__}: {exc}") from None


def _add_demo(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], demo: ModuleType | None
) -> None:
    parser = sub.add_parser(
        "demo",
        help="run the bundled demo (probe, plan and train a small model)",
        description="Run the bundled demo: probe, plan and train a small model.",
    )
    if demo is not None:
        demo.add_arguments(parser)
        parser.set_defaults(handler=lambda args: demo.main(args))


def _version() -> str:
    from autoaccum import __version__

    return __version__


def build_parser(*, demo: ModuleType | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``demo`` (the ``autoaccum.demo`` module) registers its options.

    The demo is imported only when it is the command being run, so other commands never
    pay for (or fail on) it."""
    from autoaccum.precision import PRECISIONS
    from autoaccum.probe import DEFAULT_MARGIN

    parser = argparse.ArgumentParser(
        prog="autoaccum",
        description="Memory-aware auto-batching for PyTorch: probe the largest micro-batch "
        "that fits, plan exact gradient accumulation, train.",
    )
    parser.add_argument("--version", action="version", version=f"autoaccum {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_demo(sub, demo)

    report = sub.add_parser(
        "report",
        help="print this machine's memory (GPU, torch allocator, host, cgroup)",
        description="Print a snapshot of device and host memory. GiB = 2^30 bytes.",
    )
    report.add_argument(
        "--device", help="torch device, e.g. cuda:1 (default: cuda if available, else cpu)"
    )
    report.add_argument("--json", action="store_true", help="print JSON (bytes) instead of tables")
    report.set_defaults(handler=_cmd_report)

    probe = sub.add_parser(
        "probe",
        help="probe a model's largest micro-batch, plan target_batch, explain the memory",
        description="Import MODULE, call FACTORY(), probe the largest micro-batch that trains\n"
        "(real forward/backward/optimizer steps, catching out-of-memory), plan target_batch\n"
        "exactly and show where the memory goes.",
        epilog=FACTORY_CONTRACT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    probe.add_argument(
        "factory", metavar="MODULE:FACTORY", help="where to get the model and a batch"
    )
    probe.add_argument(
        "--target-batch",
        type=int,
        required=True,
        metavar="N",
        help="samples per optimizer step; also the largest micro-batch tried",
    )
    probe.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    probe.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="autocast precision (default: auto)"
    )
    probe.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help=f"fraction of the largest size that fit given up for safety ({DEFAULT_MARGIN})",
    )
    probe.add_argument("--json", action="store_true", help="print JSON (bytes) instead of tables")
    probe.set_defaults(handler=_cmd_probe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = "demo" if args_list[:1] == ["demo"] else None
    try:
        demo = _load_demo() if command == "demo" else None
        parser = build_parser(demo=demo)
        try:
            args = parser.parse_args(args_list)
        except SystemExit as exc:  # --help, --version, or a usage error argparse printed
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        command = args.command
        return int(args.handler(args))
    except UsageError as exc:
        prog = f"autoaccum {command}" if command else "autoaccum"
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return 2
    except AutoAccumError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
