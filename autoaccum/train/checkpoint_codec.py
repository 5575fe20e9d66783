"""A checkpoint's state as plain data, both ways, so that loading one never runs code.

Checkpoints are read with ``torch.load(..., weights_only=True)``, which rebuilds tensors,
numbers, strings, ``None``, lists, tuples and dicts and refuses anything that would need to
run code. So what is saved is made of those only (:func:`encode`), and
:func:`check_loadable` proves it before a file is written: a state that holds another
object (a scheduler's helper, a numpy number in a metric) is an error naming its key at
save time, not a checkpoint that cannot be read later.

What is loaded is checked key by key against the type hints of the dataclass it becomes
(:func:`decode`): a file of the right format whose key is missing or of another type is a
:class:`~autoaccum.errors.ConfigError` naming that key, never a ``KeyError`` later. State
that is free-form (an optimizer's hyper-parameters, a scheduler's) is checked against the
live value it replaces (:func:`check_like`).
"""

from __future__ import annotations

import dataclasses
import io
import types
import typing
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from autoaccum.errors import ConfigError

__all__ = ["check_like", "check_loadable", "decode", "describe", "encode"]


def encode(value: Any) -> Any:
    """``value`` as plain data: a dataclass becomes a dict of its fields, containers are
    rebuilt with their items encoded; tensors and scalars are kept."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {key: encode(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(encode(item) for item in value)
    return value


def describe(value: object) -> str:
    """``value``'s type in words, for an error message."""
    kind = type(value)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    shown = repr(value)
    return _article(name) + (f" ({shown})" if len(shown) <= 40 else "")


# --------------------------------------------------------------------------- saving


def _round_trips(value: object) -> bool:
    """True when ``value`` pickles and loads back with ``weights_only=True``."""
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception:
        return False
    return True


def _without_tensors(value: Any) -> Any:
    """``value`` with its plain tensors left out (they always load; copying them to check
    would cost the model's size): the small skeleton that :func:`_round_trips` checks."""
    if type(value) in (torch.Tensor, torch.nn.Parameter):
        return None
    if type(value) in (dict, OrderedDict):
        return {key: _without_tensors(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_without_tensors(item) for item in value)
    return value


def _first_unloadable(value: Any, key: str) -> tuple[str, object] | None:
    """The key and value of the first part of ``value`` that does not load back safely."""
    if type(value) in (dict, OrderedDict):
        for name, item in value.items():
            if not _round_trips(name):
                return f"{key} (the key {name!r})", name
            found = _first_unloadable(item, f"{key}[{name!r}]")
            if found is not None:
                return found
    elif type(value) in (list, tuple):
        for index, item in enumerate(value):
            found = _first_unloadable(item, f"{key}[{index}]")
            if found is not None:
                return found
    elif type(value) not in (torch.Tensor, torch.nn.Parameter) and not _round_trips(value):
        return key, value
    return None


def check_loadable(payload: Mapping[str, Any], what: str) -> None:
    """A :class:`ConfigError` naming the first key of ``payload`` that a checkpoint cannot
    hold safely (``torch.load(weights_only=True)`` could not rebuild it); ``what`` says what
    was being saved."""
    if _round_trips(_without_tensors(dict(payload))):
        return
    found = None
    for name, item in payload.items():
        found = _first_unloadable(item, name)
        if found is not None:
            break
    where, value = found if found is not None else ("the checkpoint", payload)
    raise ConfigError(
        f"cannot save {what}: {where} is {describe(value)}, which a checkpoint cannot hold "
        "safely (autoaccum loads checkpoints with torch.load(weights_only=True), which never "
        "runs code, so it rebuilds only tensors, numbers, strings, None, lists, tuples and "
        "dicts). Keep that state to those types (e.g. float(x) for a numpy number), or "
        "leave the object out of the state it belongs to"
    )


# --------------------------------------------------------------------------- loading


def _name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_name(arg) for arg in typing.get_args(hint))
    if origin is not None:
        return _article(origin.__name__)
    if hint is torch.Tensor:
        return "a tensor"
    if isinstance(hint, type):
        return _article(hint.__name__) if not dataclasses.is_dataclass(hint) else "a dict"
    return str(hint)


def _article(name: str) -> str:
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def _wrong(key: str, value: object, hint: Any) -> ConfigError:
    return ConfigError(f"{key} is {describe(value)}, expected {_name(hint)}")


def _decode_sequence(hint: Any, value: Any, key: str) -> tuple[Any, ...]:
    args = typing.get_args(hint)
    if not isinstance(value, (list, tuple)):
        raise _wrong(key, value, hint)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(decode(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    if typing.get_origin(hint) is list:
        return tuple(decode(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{key} holds {len(value)} items, expected {len(args)}")
    return tuple(
        decode(arg, item, f"{key}[{i}]")
        for i, (arg, item) in enumerate(zip(args, value, strict=True))
    )


def _decode_union(hint: Any, value: Any, key: str) -> Any:
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    last: ConfigError | None = None
    for arg in (a for a in args if a is not type(None)):
        try:
            return decode(arg, value, key)
        except ConfigError as err:
            last = err
    if last is not None and len(args) - (type(None) in args) == 1:
        raise last
    raise _wrong(key, value, hint)


def _decode_dataclass(cls: type, value: Any, key: str) -> Any:
    if not isinstance(value, Mapping):
        raise _wrong(key, value, cls)
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        where = f"{key}.{field.name}" if key else field.name
        if field.name in value:
            fields[field.name] = decode(hints[field.name], value[field.name], where)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where} is missing")
    return cls(**fields)


def decode(hint: Any, value: Any, key: str) -> Any:
    """``value`` checked against the type ``hint`` (and built into it, for a dataclass);
    ``key`` names it in the :class:`ConfigError` raised when it does not match."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is object:
        return value
    if hint is type(None):
        if value is not None:
            raise _wrong(key, value, hint)
        return None
    if origin in (typing.Union, types.UnionType):
        return _decode_union(hint, value, key)
    if origin in (tuple, list):
        return _decode_sequence(hint, value, key)
    if origin is dict:
        key_hint, item_hint = typing.get_args(hint)
        if not isinstance(value, Mapping):
            raise _wrong(key, value, hint)
        return {
            decode(key_hint, k, f"{key} (a key)"): decode(item_hint, v, f"{key}[{k!r}]")
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _decode_dataclass(hint, value, key)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong(key, value, hint)
        return float(value)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _wrong(key, value, hint)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise _wrong(key, value, hint)
    return value


# --------------------------------------------------------------------------- alike


def _number(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float))


def check_like(saved: Any, live: Any, key: str) -> None:
    """A :class:`ConfigError` when ``saved`` is not of the kind of ``live``, the value it is to
    replace (a number for a number, a string for a string, a list of as many items...),
    checked where both have the key; None on either side matches anything."""
    if saved is None or live is None:
        return
    if isinstance(live, (bool, int, float)):
        same = _number(saved)
    elif isinstance(live, str):
        same = isinstance(saved, str)
    elif isinstance(live, torch.Tensor):
        same = isinstance(saved, torch.Tensor) or (_number(saved) and live.numel() == 1)
    elif isinstance(live, Mapping):
        if not isinstance(saved, Mapping):
            raise ConfigError(f"{key} is {describe(saved)}, expected a dict")
        for name in saved.keys() & live.keys():
            check_like(saved[name], live[name], f"{key}[{name!r}]")
        return
    elif isinstance(live, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(live):
            raise ConfigError(f"{key} is {describe(saved)}, expected {len(live)} items")
        for i, (a, b) in enumerate(zip(saved, live, strict=True)):
            check_like(a, b, f"{key}[{i}]")
        return
    else:
        return
    if not same:
        raise ConfigError(f"{key} is {describe(saved)}, expected {describe(live)} or alike")
