"""A Griffe extension for the docs build: the package's docstrings use Sphinx roles
(``:class:`~autoaccum.plan.Plan```, ``:func:`probe```) and reST literal-block markers
(``loop::``); Markdown shows those literally. This rewrites them, at build time only, into
inline code (``Plan``) and a plain colon, so the docstrings stay as they are in the code."""

from __future__ import annotations

import re
from typing import Any

import griffe

#: :class:`~a.b.C`, :func:`a.b`, :meth:`title <a.b.C.m>` (the target may wrap lines)
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj):`([^`]+)`")


def _code(match: re.Match[str]) -> str:
    text = " ".join(match.group(1).split())
    titled = re.fullmatch(r"(.+?)\s*<[^>]+>", text)
    if titled:
        text = titled.group(1)
    elif text.startswith("~"):
        text = text.rsplit(".", 1)[-1]
    return f"`{text}`"


def rewrite(text: str) -> str:
    """``text`` with Sphinx roles as inline code and ``::`` line ends as ``:``."""
    text = _ROLE.sub(_code, text)
    return re.sub(r"(?<=\S)::$", ":", text, flags=re.MULTILINE)


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)


class AttributeComments(griffe.Extension):
    """Sphinx's ``#:`` comments as attribute docstrings: the package documents dataclass
    fields with them (``plan: Plan  #: the plan in force at the end``), before or beside."""

    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs: Any) -> None:
        if attr.docstring is not None or attr.lineno is None:
            return
        try:
            lines = attr.module.lines  # the whole file's
        except (AttributeError, KeyError, ValueError):
            return
        if not lines or attr.lineno > len(lines):
            return
        statement = lines[attr.lineno - 1 : (attr.endlineno or attr.lineno)]
        _, hash_colon, beside = statement[-1].partition("#:") if statement else ("", "", "")
        found = [beside.strip()] if hash_colon else []
        if not found:  # comments above, nearest last
            row = attr.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#:"):
                found.insert(0, lines[row].strip()[2:].strip())
                row -= 1
        if found:
            attr.docstring = griffe.Docstring(rewrite(" ".join(found)), parent=attr)
