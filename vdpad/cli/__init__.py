"""The vdpad command line: a thin layer over the library (and, later, the service)."""

from __future__ import annotations

import json
import sys

import click

from vdpad.cli import manage
from vdpad.cli.output import EXIT_CODES_HELP
from vdpad.device import BackendFeature, VhostError, VhostVdpa, flags

DEVICE_KINDS = {1: "net", 2: "blk"}


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
def main() -> None:
    """Control Linux vhost-vdpa devices."""


for _command in (manage.mgmtdev, manage.dev, manage.attach, manage.detach):
    main.add_command(_command)


@main.command()
@click.argument("node", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def info(node: str, as_json: bool) -> None:
    """What the vhost-vdpa device at NODE offers (opens it, takes ownership, reads)."""
    try:
        with VhostVdpa(node) as dev:
            dev.set_owner()
            device_id = dev.get_device_id()
            features = dev.get_features()
            backend = dev.get_backend_features()
            vqs = dev.get_vqs_count()
            groups = [dev.get_vring_group(i) for i in range(vqs)] if hasattr(dev, "get_vring_group") else []
            iova = dev.get_iova_range()
            report = {
                "node": node,
                "device_id": device_id,
                "kind": DEVICE_KINDS.get(device_id, "other"),
                "features": features,
                "feature_names": flags.describe(
                    features, flags.VirtioFeature,
                    flags.NetFeature if device_id == 1 else flags.BlkFeature),
                "backend_features": int(backend),
                "backend_feature_names": flags.describe(int(backend), BackendFeature),
                "vqs": vqs,
                "vq_groups": groups,
                "groups": dev.get_group_num(),
                "address_spaces": dev.get_as_num(),
                "vring_num_max": dev.get_vring_num(),
                "config_size": dev.get_config_size(),
                "iova_range": [iova.first, iova.last],
            }
    except (OSError, VhostError) as error:
        click.echo(f"vdpad: {error}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(report))
        return
    for key, value in report.items():
        if key == "iova_range":
            value = f"{value[0]:#x}-{value[1]:#x}"
        elif isinstance(value, list):
            value = " ".join(map(str, value))
        elif key in ("features", "backend_features"):
            value = hex(value)
        click.echo(f"{key:24} {value}")
