"""Public names imported on first use (PEP 562), so that ``import autoaccum`` costs no torch.

The package's ``__init__`` names where each public name lives; :func:`attach` gives it the
module ``__getattr__`` that imports the name's module the first time the name is read (then
keeps it as a plain attribute) and the ``__dir__`` that lists the names before that.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["attach"]


def attach(
    package: str, names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose ``names`` map each lazily imported
    public name to the module that defines it."""

    def __getattr__(name: str) -> Any:
        where = names.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where), name)
        setattr(sys.modules[package], name, value)  # the next read is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__
