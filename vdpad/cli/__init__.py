"""The vdpad command line: a thin layer over the library and the daemon's client."""

from __future__ import annotations

import click

from vdpad.cli import daemon, info, manage
from vdpad.cli.output import EXIT_CODES_HELP


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
def main() -> None:
    """Control Linux vhost-vdpa devices."""


for _command in (manage.mgmtdev, manage.dev, manage.attach, manage.detach, info.info,
                 daemon.serve, daemon.status, daemon.session, daemon.iotlb, daemon.domain):
    main.add_command(_command)
