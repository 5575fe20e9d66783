"""The ``autoaccum`` command (also ``python -m autoaccum``).

Subcommands::

    autoaccum report [--device D] [--json]        this machine's memory
    autoaccum probe MODULE:FACTORY --target-batch N [--device D] [--precision P]
                    [--margin F] [--json]        probe a model, plan, explain the memory
    autoaccum demo [...]                          the bundled demo (see ``autoaccum demo -h``)

Exit codes: 0 success; 1 an :class:`~autoaccum.errors.AutoAccumError` (printed as
``error: <message>``, no traceback); 2 a usage error (bad arguments, a device this
machine does not have, a MODULE:FACTORY that cannot be imported, found or called, a
factory that breaks the contract).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from autoaccum import __version__, demo
from autoaccum.device import check_device
from autoaccum.errors import AutoAccumError, ConfigError
from autoaccum.factory import FACTORY_CONTRACT, UsageError, make
from autoaccum.memory.collect import memory_report
from autoaccum.memory.explain import explain
from autoaccum.memory.peaks import DEFAULT_MARGIN
from autoaccum.plan import make_plan
from autoaccum.probing.fastest import CHOICES
from autoaccum.probing.trials import probe
from autoaccum.render import print_report
from autoaccum.step.losses import default_loss
from autoaccum.step.model import check_model, default_optimizer, min_micro
from autoaccum.step.precision import PRECISIONS

__all__ = ["build_parser", "main"]

# --------------------------------------------------------------------------- commands


def _print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return check_device(name)
    except ConfigError as exc:
        raise UsageError(f"bad --device: {exc}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _cmd_report(args: argparse.Namespace) -> int:
    report = memory_report(_device(args.device) if args.device is not None else None)
    if args.json:
        _print_json(report.to_dict())
    else:
        print_report(report)
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    dev = _device(args.device)  # before the factory builds anything
    made = make(args.factory)
    model = check_model(made.model).to(dev)
    optimizer = made.optimizer if made.optimizer is not None else default_optimizer(model)
    result = probe(
        model,
        made.batch,
        loss_fn=made.loss_fn if made.loss_fn is not None else default_loss,
        optimizer=optimizer,
        upper=args.target_batch,
        precision=args.precision,
        margin=args.margin,
        device=dev,
        choose=args.choose,
    )
    plan = make_plan(args.target_batch, result.max_micro, min_micro=min_micro(model))
    report = memory_report(dev)
    # the probe measured the fixed memory while its trials' optimizer state existed; the
    # optimizer is back to empty now, so a footprint taken here would miss that state
    explained = explain(result, plan, None, report)
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
    for obj in (result, plan, explained):
        print_report(obj)
    return 0


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "demo",
        help="run the bundled demo (probe, plan and train a small model)",
        description="Run the bundled demo: probe, plan and train a small model.",
    )
    demo.add_arguments(parser, positive_int=_positive_int)
    parser.set_defaults(handler=demo.main)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``autoaccum`` command."""
    parser = argparse.ArgumentParser(
        prog="autoaccum",
        description="Memory-aware auto-batching for PyTorch: probe the largest micro-batch "
        "that fits, plan exact gradient accumulation, train.",
    )
    parser.add_argument("--version", action="version", version=f"autoaccum {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_demo(sub)

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
        type=_positive_int,
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
        help="share of the device's memory limit kept spare at the chosen size, where memory "
        f"is measured (CUDA); elsewhere the same share of the samples (default {DEFAULT_MARGIN})",
    )
    probe.add_argument(
        "--choose",
        choices=CHOICES,
        default="auto",
        help="the micro-batch under the ceiling: the fastest plan (timed), the largest, or "
        "auto: fastest on a GPU (default: auto)",
    )
    probe.add_argument("--json", action="store_true", help="print JSON (bytes) instead of tables")
    probe.set_defaults(handler=_cmd_probe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command: str | None = None
    try:
        parser = build_parser()
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
