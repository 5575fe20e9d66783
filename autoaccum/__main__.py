"""``python -m autoaccum``: the same as the ``autoaccum`` command."""

from __future__ import annotations

from autoaccum.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
