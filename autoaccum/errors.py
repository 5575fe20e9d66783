"""The error family. Every error a user can provoke is an :class:`AutoAccumError`.

Messages say what was wrong and what to do about it; they never leak an
``AssertionError`` or a stack trace from deep inside torch.
"""

from __future__ import annotations

__all__ = [
    "AutoAccumError",
    "BatchError",
    "ConfigError",
    "DistributedError",
    "NoBatchFitsError",
    "NonFiniteLossError",
    "PlanError",
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
