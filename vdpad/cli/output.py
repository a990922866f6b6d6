"""How the management commands print: aligned tables or key/value lines, JSON for scripts, exit codes."""

from __future__ import annotations

import errno
import functools
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from vdpad.device.errors import ENOTSUPP, InvalidArgument, NotSupportedError
from vdpad.mgmt.errors import AlreadyExists, Busy, NotFound, NotSupported, PermissionDenied, WaitTimeout
from vdpad.service.config import ConfigError

# Exit codes scripts can rely on; click's own usage errors exit with 2 as well.
EXIT_CODES = (
    (0, "ok"),
    (1, "the kernel or the system refused (message says why)"),
    (2, "bad usage or bad input (arguments, a configuration file); nothing was changed"),
    (3, "no such device or management device"),
    (4, "a device of that name exists already"),
    (5, "permission denied (needs root / CAP_NET_ADMIN)"),
    (6, "not supported: a kernel module is missing (message names it) or the device cannot do it"),
    (7, "busy: the device node is open (by another process)"),
    (8, "timed out waiting for the kernel (a device node that did not appear)"),
)
_BY_KIND: tuple[tuple[type[BaseException], int], ...] = (
    (InvalidArgument, 2), (ConfigError, 2), (NotFound, 3), (FileNotFoundError, 3), (AlreadyExists, 4), (PermissionDenied, 5), (PermissionError, 5),
    (NotSupported, 6), (NotSupportedError, 6), (Busy, 7), (WaitTimeout, 8),
)
EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES)

F = TypeVar("F", bound=Callable[..., Any])

json_option = click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")


def exit_code(error: BaseException) -> int:
    if isinstance(error, OSError) and error.errno == errno.EBUSY and error.filename is None:
        return 7  # vhost-vdpa allows one open: another process has the node
    if isinstance(error, OSError) and error.errno == ENOTSUPP:
        return 6  # e.g. opening a node behind an IOMMU that is not cache-coherent
    return next((code for kind, code in _BY_KIND if isinstance(error, kind)), 1)


def reports_errors(command: F) -> F:
    """One line on stderr and the documented exit code, instead of a traceback."""
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (OSError, ValueError) as error:
            notes = "; ".join(getattr(error, "__notes__", ()))
            click.echo(f"vdpad: {_message(error)}{'; ' + notes if notes else ''}", err=True)
            sys.exit(exit_code(error))
    return run  # type: ignore[return-value]


def _message(error: BaseException) -> str:
    # An OSError whose text already names what failed needs no "[Errno N]" in front.
    if isinstance(error, OSError) and error.strerror and error.filename is None:
        return error.strerror
    return str(error)


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=None, sort_keys=False))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as aligned columns under upper-case headers; None shows as "-"."""
    cells = [[header for _, header in columns]]
    cells += [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def fields(items: Sequence[tuple[str, Any]]) -> str:
    """key/value lines, keys aligned."""
    width = max((len(k) for k, _ in items), default=0)
    return "\n".join(f"{k.ljust(width)}  {_cell(v, ' ')}" for k, v in items)


def _cell(value: Any, joiner: str = ",") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return joiner.join(map(str, value)) or "-"
    return str(value)
