"""The vdpad command run in-process, as the kernel tests drive it (click's runner: no exec, no
second Python start-up under TCG). tests/privilege.py runs it as another user."""

from __future__ import annotations

from click.testing import CliRunner

from vdpad.cli import main


def vdpad(*args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `vdpad ARGS`; an exception other than the exit is raised."""
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr
