"""`vdpad info NODE`: what a vhost-vdpa device offers, read through its own fd."""

from __future__ import annotations

from typing import Any

import click

from vdpad.cli.manage import feature_names, json_option
from vdpad.cli.output import emit_json, fields, reports_errors
from vdpad.device import BackendFeature, VhostVdpa, flags

DEVICE_KINDS = {1: "net", 2: "blk"}


def read_info(node: str) -> dict[str, Any]:
    with VhostVdpa(node) as dev:
        dev.set_owner()  # the vhost-vdpa ioctls below need an owner
        device_id = dev.get_device_id()
        features = dev.get_features()
        backend = int(dev.get_backend_features())
        vqs = dev.get_vqs_count()
        iova = dev.get_iova_range()
        return {
            "node": node,
            "device_id": device_id,
            "kind": DEVICE_KINDS.get(device_id, "other"),
            "features": features,
            "feature_names": feature_names(features, device_id),
            "backend_features": backend,
            "backend_feature_names": flags.describe(backend, BackendFeature),
            "vqs": vqs,
            "vq_groups": [dev.get_vring_group(i) for i in range(vqs)],
            "groups": dev.get_group_num(),
            "address_spaces": dev.get_as_num(),
            "vring_num_max": dev.get_vring_num(),
            "config_size": dev.get_config_size(),
            "iova_range": [iova.first, iova.last],
        }


@click.command()
@click.argument("node", type=click.Path(dir_okay=False))
@json_option
@reports_errors
def info(node: str, as_json: bool) -> None:
    """What the vhost-vdpa device at NODE offers (opens it, takes ownership, reads)."""
    report = read_info(node)
    if as_json:
        emit_json(report)
        return
    shown = dict(report, features=f"{report['features']:#x}",
                 backend_features=f"{report['backend_features']:#x}",
                 iova_range="{:#x}-{:#x}".format(*report["iova_range"]))
    click.echo(fields(list(shown.items())))
