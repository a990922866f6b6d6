"""The three systemd protocols the daemon speaks, without libsystemd.

notify(): sd_notify(3), one datagram of KEY=VALUE lines to $NOTIFY_SOCKET.
listen_fds(): sd_listen_fds(3), sockets passed from fd 3 on when $LISTEN_PID is us.
watchdog_interval(): sd_watchdog_enabled(3), how often WATCHDOG=1 must come.
Outside systemd (no such variables) each is a no-op: False, [], None.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

import structlog

log = structlog.get_logger("vdpad.service.systemd")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START


class SystemdEnvError(ValueError):
    """A systemd environment variable holds something the protocol does not allow."""


def _env_int(name: str, *, minimum: int) -> int | None:
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        value = int(text, 10)
    except ValueError:
        raise SystemdEnvError(f"${name}={text!r} is not a decimal number") from None
    if value < minimum:
        raise SystemdEnvError(f"${name}={text!r} is below {minimum}")
    return value


def _notify_address(text: str) -> str | bytes:
    if text.startswith("/"):
        return text
    if text.startswith("@") and len(text) > 1:
        return b"\0" + text[1:].encode()  # abstract namespace
    raise SystemdEnvError(f"$NOTIFY_SOCKET={text!r} is neither a path (/...) nor an abstract name (@...)")


def notify(*, ready: bool = False, status: str | None = None, stopping: bool = False,
           watchdog: bool = False, reloading: bool = False) -> bool:
    """Tell the service manager about a state change; True when the datagram went.

    Never blocks: a notification socket that is full or gone loses this one
    message (logged), as sd_notify's callers ignore its errors too.
    """
    if status is not None and "\n" in status:
        raise ValueError(f"a systemd STATUS is one line, got {status!r}")
    lines = [line for wanted, line in ((ready, "READY=1"), (reloading, "RELOADING=1"),
                                        (stopping, "STOPPING=1"), (watchdog, "WATCHDOG=1")) if wanted]
    if status is not None:
        lines.append(f"STATUS={status}")
    if not lines:
        raise ValueError("notify() needs at least one of ready, status, stopping, watchdog, reloading")
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    address = _notify_address(target)
    message = ("\n".join(lines) + "\n").encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
        try:
            sock.sendto(message, address)
        except OSError as error:
            log.warning("systemd.notify_failed", socket=target, sent=" ".join(lines),
                        error=errno.errorcode.get(error.errno or 0, str(error)))
            return False
    log.debug("systemd.notified", sent=" ".join(lines))
    return True


def listen_fds() -> list[socket.socket]:
    """The sockets socket activation passed us (fds 3..), each owned by its socket object.

    The variables are removed from the environment either way, so that no
    child process takes our sockets for its own.
    """
    try:
        pid = _env_int("LISTEN_PID", minimum=1)
        count = _env_int("LISTEN_FDS", minimum=0)
    finally:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if pid is None or count is None or pid != os.getpid():
        return []
    sockets: list[socket.socket] = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
            sockets.append(socket.socket(fileno=fd))
        except OSError as error:
            for taken in sockets:
                taken.close()
            raise SystemdEnvError(f"$LISTEN_FDS={count}: fd {fd} is not a socket we can use "
                                  f"({os.strerror(error.errno or 0)})") from error
    log.debug("systemd.listen_fds", fds=[s.fileno() for s in sockets])
    return sockets


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half the manager's timeout), or None without a watchdog."""
    usec = _env_int("WATCHDOG_USEC", minimum=1)
    if usec is None:
        return None
    pid = _env_int("WATCHDOG_PID", minimum=1)
    if pid is not None and pid != os.getpid():
        return None
    return usec / 2 / 1_000_000
