"""The vdpad command line: a thin layer over the library (and, later, the service)."""

from __future__ import annotations

import click

from vdpad.cli import info, manage
from vdpad.cli.output import EXIT_CODES_HELP


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
def main() -> None:
    """Control Linux vhost-vdpa devices."""


for _command in (manage.mgmtdev, manage.dev, manage.attach, manage.detach, info.info):
    main.add_command(_command)
