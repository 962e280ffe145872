"""``python -m fusion``: the same command line as the ``fusion`` console script (see :mod:`fusion.cli`)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
