"""The ``autoaccum`` command (also ``python -m autoaccum``).

Subcommands::

    autoaccum report [--device D] [--json]        this machine's memory
    autoaccum probe MODULE:FACTORY --target-batch N [--device D] [--precision P]
                    [--margin F] [--budget-mib N] [--plot FILE] [--json]
                                                  probe a model, plan, explain the memory
    autoaccum demo [...]                          the bundled demo (see ``autoaccum demo -h``)

Exit codes: 0 success; 1 an :class:`~autoaccum.errors.AutoAccumError` (printed as
``error: <message>``, no traceback); 2 a usage error (bad arguments, a device this
machine does not have, a MODULE:FACTORY that cannot be imported, found or called, a
factory that breaks the contract).

torch and everything that needs it are imported when a command runs, not with this module:
``autoaccum --version`` answers without them.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from autoaccum._version import __version__
from autoaccum.errors import AutoAccumError, ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["build_parser", "main"]

# --------------------------------------------------------------------------- commands


def _print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _device(name: str | None) -> torch.device:
    import torch

    from autoaccum.device import check_device
    from autoaccum.factory import UsageError

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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _cmd_report(args: argparse.Namespace) -> int:
    from autoaccum.memory.collect import memory_report
    from autoaccum.render import print_report

    report = memory_report(_device(args.device) if args.device is not None else None)
    if args.json:
        _print_json(report.to_dict())
    else:
        print_report(report)
    return 0


def _probe_device(args: argparse.Namespace) -> torch.device:
    """The device to probe on; an emulated budget (``--budget-mib``) is a CPU's."""
    from autoaccum.factory import UsageError

    if args.budget_mib is None:
        return _device(args.device)
    dev = _device(args.device or "cpu")
    if dev.type != "cpu":
        raise UsageError(
            f"--budget-mib emulates a device on the CPU, and --device is {dev}: drop one "
            "(on a GPU the probe runs against the device's real memory)"
        )
    return dev


def _cmd_probe(args: argparse.Namespace) -> int:
    from autoaccum.emulate import MemoryBudget, training_bytes
    from autoaccum.factory import UsageError, make
    from autoaccum.memory.collect import memory_report
    from autoaccum.memory.explain import explain
    from autoaccum.plan import make_plan
    from autoaccum.probing.trials import probe
    from autoaccum.render import print_plan, print_report
    from autoaccum.render.plot import check_plot, plot_probe
    from autoaccum.step.losses import default_loss
    from autoaccum.step.model import check_model, default_optimizer, min_micro

    dev = _probe_device(args)  # before the factory builds anything
    if args.plot is not None:  # before any work: a memory reading, the file name, matplotlib
        if dev.type == "cpu" and args.budget_mib is None:
            raise UsageError(
                "--plot draws the trials against the memory limit, and the CPU has none: add "
                "--budget-mib N to probe on an emulated device of N MiB, or probe on a GPU"
            )
        try:
            check_plot(args.plot)
        except ConfigError as exc:  # a missing matplotlib is an error of its own (exit 1)
            raise UsageError(f"bad --plot: {exc}") from None
    made = make(args.factory)
    model = check_model(made.model).to(dev)
    if args.budget_mib is not None:  # the same parameters: an optimizer made over them works
        budget = int(args.budget_mib * 2**20)
        model = MemoryBudget(model, budget, training_bytes(model))
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
    drawn = plot_probe(result, plan, args.plot) if args.plot is not None else None
    if args.json:
        _print_json(
            {
                "probe": result.to_dict(),
                "plan": plan.to_dict(),
                "breakdown": explained.to_dict(),
                "memory": report.to_dict(),
                **({"plot": str(drawn)} if drawn is not None else {}),
            }
        )
        return 0
    print_report(result)
    print_plan(plan, result)
    print_report(explained)
    if drawn is not None:
        print(f"drawn: {drawn}")
    return 0


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "demo",
        help="run the bundled demo (probe, plan and train a small model)",
        description="Run the bundled demo: probe, plan and train a small model.",
    )
    from autoaccum import demo

    demo.add_arguments(parser, positive_int=_positive_int)
    parser.set_defaults(handler=demo.main)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``autoaccum`` command."""
    from autoaccum.factory import FACTORY_CONTRACT
    from autoaccum.memory.peaks import DEFAULT_MARGIN
    from autoaccum.probing.fastest import CHOICES
    from autoaccum.step.precision import PRECISIONS

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
    probe.add_argument(
        "--budget-mib",
        type=_positive_float,
        metavar="N",
        help="probe on an emulated device of N MiB (2^20 bytes) on the CPU, to watch the "
        "probe run into a limit as it does on a GPU: activations count as the forward saves "
        "them, the parameters, their gradients and two optimizer moments (AdamW's) as resident",
    )
    probe.add_argument(
        "--plot",
        metavar="FILE",
        help="draw the trials against the memory limit (sizes, peaks, the peak line, the "
        "margin, the chosen size) into FILE (.svg, .png or .pdf); needs matplotlib: "
        "pip install 'autoaccum[plot]'",
    )
    probe.add_argument("--json", action="store_true", help="print JSON (bytes) instead of tables")
    probe.set_defaults(handler=_cmd_probe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list == ["--version"]:  # answered without importing torch (seconds)
        sys.stdout.write(f"autoaccum {__version__}\n")
        return 0
    # torch warns at its import where numpy is not installed; no command here needs numpy
    warnings.filterwarnings("ignore", "Failed to initialize NumPy", UserWarning)
    from autoaccum.factory import UsageError

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
