"""The error family, and the validators that turn bad arguments into its errors.

Every error a user can provoke is an :class:`AutoAccumError`. Messages say what was
wrong and what to do about it; they never leak an ``AssertionError`` or a stack trace
from deep inside torch. The ``check_*`` functions here are the one place arguments are
validated, so the same mistake gets the same message from ``fit``, ``probe``, the
planner and the command line.
"""

from __future__ import annotations

import datetime
import math
import numbers
import operator
from typing import Any

__all__ = [
    "AutoAccumError",
    "BatchError",
    "ConfigError",
    "DistributedError",
    "MissingExtraError",
    "NoBatchFitsError",
    "NonFiniteLossError",
    "PlanError",
    "check_callable",
    "check_count",
    "check_fraction",
    "check_item_count",
    "check_positive",
    "check_timeout",
]


class AutoAccumError(Exception):
    """Base class of every error autoaccum raises on purpose."""


class ConfigError(AutoAccumError, ValueError):
    """An argument is invalid: wrong type, out of range, or inconsistent with another."""


class PlanError(ConfigError):
    """No exact plan exists for the requested target batch (e.g. not divisible by world size)."""


class BatchError(AutoAccumError, ValueError):
    """A batch cannot be measured, split, joined or moved (empty, ragged, unknown type)."""


class NoBatchFitsError(AutoAccumError, RuntimeError):
    """Even the smallest micro-batch tried ran out of memory."""


class NonFiniteLossError(AutoAccumError, FloatingPointError):
    """A loss was NaN or infinite; the window it belonged to was not applied to the weights."""


class DistributedError(AutoAccumError, RuntimeError):
    """The process group is missing, inconsistent, or ranks disagree."""


class MissingExtraError(AutoAccumError, ImportError):
    """An optional integration's package is not installed; the message says what to install."""

    def __init__(self, extra: str, package: str, what: str) -> None:
        super().__init__(
            f"{what} needs the {package!r} package, which is not installed; install it with "
            f"pip install 'autoaccum[{extra}]'"
        )
        self.extra = extra
        self.package = package


def _is_integral(value: object) -> bool:
    """True for ints and integer scalars (numpy's, a 0-d integer tensor), never for bools."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return False
    try:
        operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def check_count(name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` as an int ≥ ``minimum``, or a :class:`ConfigError` that says what to pass."""
    if not _is_integral(value):
        raise ConfigError(
            f"{name} must be an int, got {type(value).__name__} {value!r}; pass a whole number "
            f"≥ {minimum}, e.g. {name}={max(minimum, 256) if minimum > 0 else 0}"
        )
    number = operator.index(value)  # type: ignore[arg-type]
    if number < minimum:
        raise ConfigError(f"{name} must be ≥ {minimum}, got {number}")
    return number


def check_fraction(name: str, value: object, *, below: float, default: float) -> float:
    """``value`` as a float in ``[0, below)`` (e.g. a margin), or a :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(
            f"{name} must be a number in [0, {below}), got {type(value).__name__} {value!r}; "
            f"the default is {default}"
        )
    number = float(value)
    if not 0.0 <= number < below:
        raise ConfigError(f"{name} must be in [0, {below}), got {number}; the default is {default}")
    return number


def check_positive(name: str, value: object) -> float:
    """``value`` as a finite float > 0 (e.g. ``max_grad_norm``), or a :class:`ConfigError`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or float(value) <= 0
    ):
        raise ConfigError(f"{name} must be a positive number or None, got {value!r}")
    return float(value)


def check_timeout(value: object) -> datetime.timedelta:
    """A timeout given in seconds (a positive number, as everywhere in autoaccum) or as a
    ``datetime.timedelta``, as a timedelta; else a :class:`ConfigError`."""
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(
            f"timeout must be a number of seconds (or a datetime.timedelta), got "
            f"{type(value).__name__} {value!r}; e.g. timeout=600"
        )
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {value!r}")
    return datetime.timedelta(seconds=seconds)


def check_callable(name: str, value: object, signature: str) -> Any:
    """``value`` when it is callable, else a :class:`ConfigError` naming the expected call."""
    if not callable(value):
        raise ConfigError(
            f"{name} must be callable as {signature}, got {type(value).__name__} {value!r}"
        )
    return value


def check_item_count(value: object, where: str) -> float:
    """A ``count_fn`` result as a float ≥ 0: a number or a one-element tensor, finite.

    Integer and floating scalars of any library (Python, numpy, torch) are accepted.
    """
    item = getattr(value, "item", None)
    numel = getattr(value, "numel", None)
    if callable(numel) and callable(item):  # a tensor (or numpy array)
        if numel() != 1:
            shape = tuple(getattr(value, "shape", ()))
            raise ConfigError(
                f"count_fn must return one number (items in the micro-batch), got a tensor of "
                f"shape {shape} ({where})"
            )
        value = item()
    elif callable(item) and not isinstance(value, numbers.Number):
        value = item()  # a numpy scalar
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(
            f"count_fn must return a number of items ≥ 0, got {type(value).__name__} {value!r} "
            f"({where})"
        )
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ConfigError(
            f"count_fn must return a finite number of items ≥ 0, got {number} ({where}); it "
            "counts the items the micro-batch's mean loss is over (samples, or target tokens)"
        )
    return number
