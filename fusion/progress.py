"""Progress bars that do not flood logs: every progress bar of ``fusion`` goes through :func:`tqdm`.

On a terminal (or in a Jupyter kernel) the bars are tqdm's own. When the output is not a terminal
(a log file, a pipe, a batch job, pytest's capture) tqdm would still write a carriage-return redraw
every step, which becomes hundreds of lines in a log; there the bars are switched off and each stage
is logged once instead (logger ``fusion.progress``, level INFO, shown when logging is configured at
INFO). ``FUSION_PROGRESS=always`` or ``never`` overrides the detection.

Example:
    >>> from fusion.progress import tqdm
    >>> for batch in tqdm(range(3), desc="evaluate"):  # a bar on a terminal, nothing in a log
    ...     pass
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from tqdm.auto import tqdm as _tqdm

__all__ = ["interactive", "tqdm"]

logger = logging.getLogger(__name__)

#: Environment variable overriding the terminal detection: ``always``, ``never`` or ``auto`` (default).
ENVIRONMENT = "FUSION_PROGRESS"


def interactive() -> bool:
    """Whether progress bars are drawn: ``FUSION_PROGRESS``, else a Jupyter kernel or a terminal on stderr."""
    setting = os.environ.get(ENVIRONMENT, "auto").strip().lower()
    if setting in ("always", "1", "true", "yes"):
        return True
    if setting in ("never", "0", "false", "no"):
        return False
    if "ipykernel" in sys.modules:  # tqdm.auto draws a notebook widget there
        return True
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def tqdm(iterable: Any = None, *args: Any, disable: bool | None = False, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm`` with the same arguments, drawn only when :func:`interactive` (else one log line)."""
    if not disable and not interactive():
        desc = kwargs.get("desc") or (args[0] if args and isinstance(args[0], str) else None) or "progress"
        total = kwargs.get("total")
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        logger.info("%s%s", desc, f" ({total} steps)" if total is not None else "")
        disable = True
    return _tqdm(iterable, *args, disable=disable, **kwargs)
