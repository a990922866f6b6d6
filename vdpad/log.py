"""structlog set-up: every message to the kernel is a debug event (as QEMU's trace points).

Level from $VDPAD_LOG (debug, info, warning, error; default warning). Under
systemd, when $JOURNAL_STREAM names our stderr, each event goes to the
journal in its native protocol, its keys as fields (DEVICE=, SESSION=, OP=,
...) that `journalctl -o json` and `journalctl DEVICE=vdpa0` see; otherwise a
console line to stderr. Applied once, only when the application has not
configured structlog itself, so a host program's own set-up wins.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

import structlog

JOURNAL_SOCKET = "/run/systemd/journal/socket"  # where journald reads native-protocol datagrams
IDENTIFIER = "vdpad"
OWN_FIELDS = frozenset({"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "EVENT"})  # set by JournalRenderer
# syslog(3) priorities by structlog method name.
PRIORITIES = {"debug": 7, "info": 6, "msg": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3,
              "critical": 2, "fatal": 2}


def configure(level: str | None = None) -> None:
    name = (level or os.environ.get("VDPAD_LOG") or "warning").upper()
    number = logging.getLevelName(name)
    if not isinstance(number, int):
        raise ValueError(f"VDPAD_LOG={name.lower()!r} is not a log level (debug, info, warning, error)")
    console = structlog.dev.ConsoleRenderer(colors=False)
    if stderr_is_journal():
        processors: list[Any] = [structlog.processors.format_exc_info, JournalRenderer(console)]
        factory: Any = JournalLoggerFactory(JOURNAL_SOCKET)
    else:
        processors = [structlog.processors.TimeStamper(fmt="%H:%M:%S.%f"), console]
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=[structlog.processors.add_log_level, *processors],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )


def debug_enabled(logger: Any) -> bool:
    """Whether `logger`'s debug events go anywhere: a filtering logger knows (its level is bound when it
    is made), any other is given every event. Hot paths ask once and skip building events nobody reads."""
    enabled = getattr(logger, "is_enabled_for", None)
    return enabled is None or enabled(logging.DEBUG)


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=dev:inode of the stream it connected; a redirection changes it."""
    try:
        device, inode = (int(n) for n in os.environ["JOURNAL_STREAM"].split(":"))
        stat = os.fstat(sys.stderr.fileno())
    except (KeyError, ValueError, OSError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def field_name(key: str) -> str:
    """A journal field name: A-Z, 0-9 and _, no leading _ (those are journald's own) or digit."""
    name = re.sub(r"[^A-Z0-9_]", "_", key.upper()).lstrip("_0123456789")
    return name[:64] or "FIELD"


def event_field_name(key: str) -> str:
    """An event key's field, kept clear of the fields every entry has (a key `message` is VDPAD_MESSAGE)."""
    name = field_name(key)
    return f"VDPAD_{name}" if name in OWN_FIELDS else name


def journal_field(name: str, value: str) -> bytes:
    data = value.encode(errors="replace")
    if b"\n" in data:  # the binary form: name, newline, little-endian u64 length, data
        return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


class JournalRenderer:
    """The last processor: an event as one native-protocol datagram, and its console line as fallback."""

    def __init__(self, console: structlog.dev.ConsoleRenderer) -> None:
        self.console = console

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        line = functools.partial(self.console, logger, method, dict(event))  # rendered only when needed
        event.pop("level", None)
        text = str(event.pop("event", ""))
        fields = [journal_field("MESSAGE", " ".join([text, *(f"{k}={v}" for k, v in event.items())])),
                  journal_field("PRIORITY", str(PRIORITIES.get(method, 6))),
                  journal_field("SYSLOG_IDENTIFIER", IDENTIFIER),
                  journal_field("EVENT", text)]
        fields += [journal_field(event_field_name(k), str(v)) for k, v in event.items()]
        return {"datagram": b"".join(fields), "line": line}


class JournalLogger:
    """Sends each rendered event to journald; a datagram it cannot take goes to stderr as a line."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self._sock = sock
        self._path = path

    def msg(self, *, datagram: bytes, line: Callable[[], str]) -> None:
        try:
            self._sock.sendto(datagram, self._path)
        except OSError:  # full (never block the caller), too big, or no journald: the stream still reaches it
            print(line(), file=sys.stderr, flush=True)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class JournalLoggerFactory:
    """Loggers sharing the process's one journal socket (unbound, non-blocking), made on first use."""

    _sock: socket.socket | None = None

    def __init__(self, path: str) -> None:
        self._path = path

    def __call__(self, *args: Any) -> JournalLogger:
        if JournalLoggerFactory._sock is None:
            JournalLoggerFactory._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        return JournalLogger(JournalLoggerFactory._sock, self._path)


if not structlog.is_configured():
    configure()
