"""Where tlops log lines go, set up in one place for the pipeline steps, the DDP ranks and the CLI.

``tlops serve`` keeps its own one-line set-up beside the server (one logger, no name in the line).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

STEP_FORMAT = "[tlops] %(asctime)s %(levelname)s %(name)s: %(message)s"


def to_stderr(fmt: str = STEP_FORMAT, level: int = logging.INFO, name: str = "tlops", datefmt: str | None = "%H:%M:%S",
              keep: Callable[[logging.LogRecord], bool] | None = None) -> None:
    """Lines of the logger ``name`` (and those below it) on stderr in ``fmt``.

    A named logger gets its own handler once per process (a later call changes nothing: the kfp executor and
    torchrun configure the root logger for themselves) and stops propagating. ``name`` "" is the root logger,
    set up anew on every call (libraries' lines too; ``keep`` decides which are shown)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(fmt, datefmt))
    if keep is not None:
        handler.addFilter(keep)
    if not name:
        logging.basicConfig(level=level, handlers=[handler], force=True)
        return
    logger = logging.getLogger(name)
    if any(getattr(h, "_tlops", False) for h in logger.handlers):
        return
    handler._tlops = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
