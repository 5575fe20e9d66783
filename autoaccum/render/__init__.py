"""Drawing with rich: the tables and bars (:mod:`~autoaccum.render.tables`), the progress
bar (:mod:`~autoaccum.render.progress`) and their words (:mod:`~autoaccum.render.text`).

The only package of autoaccum that imports rich. It knows the data classes; they never
know it. It is imported by the command line and, when something is to be shown, by
``fit``: importing ``autoaccum`` itself never imports rich.
"""

from __future__ import annotations

from autoaccum.render.progress import TrainProgress
from autoaccum.render.tables import (
    print_fit_report,
    print_plan,
    print_report,
    render_text,
    renderable,
)

__all__ = [
    "TrainProgress",
    "print_fit_report",
    "print_plan",
    "print_report",
    "render_text",
    "renderable",
]
