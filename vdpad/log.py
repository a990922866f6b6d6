"""structlog set-up: every message to the kernel is a debug event (as QEMU's trace points).

Level from $VDPAD_LOG (debug, info, warning, error; default warning), to
stderr. Applied once, only when the application has not configured structlog
itself, so a host program's own set-up wins.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(level: str | None = None) -> None:
    name = (level or os.environ.get("VDPAD_LOG") or "warning").upper()
    number = logging.getLevelName(name)
    if not isinstance(number, int):
        raise ValueError(f"VDPAD_LOG={name.lower()!r} is not a log level (debug, info, warning, error)")
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S.%f"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


if not structlog.is_configured():
    configure()
