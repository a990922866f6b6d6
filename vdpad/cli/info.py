"""`vdpad info NODE`: what a vhost-vdpa device offers, read through its own fd.

Every query the device (or the kernel) does not support shows as `-` (JSON
null) and the rest is still shown. vhost-vdpa allows one open at a time:
while another process holds the node, what netlink knows of the device is
shown instead (device id, queues, largest ring, offered and negotiated
features), the fields only the fd can tell are null, and stderr says who
holds the node.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any, TypeVar

import click
import structlog

from vdpad.cli.manage import feature_names
from vdpad.cli.output import emit_json, fields, json_option, reports_errors
from vdpad.device import BackendFeature, NotSupportedError, VhostVdpa, flags
from vdpad.mgmt import model
from vdpad.mgmt.binding import holders
from vdpad.mgmt.netlink import VdpaNetlink
from vdpad.mgmt.parent import device_of_node

log = structlog.get_logger("vdpad.cli")
T = TypeVar("T")

# Every report has these keys, in this order, whichever way it was read.
FIELDS = (
    "node", "device", "source", "held_by", "device_id", "class", "features", "feature_names",
    "negotiated_features", "negotiated_feature_names", "backend_features", "backend_feature_names",
    "vqs", "vq_groups", "vring_sizes", "groups", "address_spaces", "vring_num_max", "config_size", "iova_range",
)
_HEX_FIELDS = ("features", "negotiated_features", "backend_features")


def _report(node: str, **known: Any) -> dict[str, Any]:
    report = dict.fromkeys(FIELDS)
    report.update(node=node, **known)
    device_id = report["device_id"]
    report["class"] = None if device_id is None else model.class_name(device_id)
    for key in ("features", "negotiated_features"):
        report[f"{key[:-1]}_names"] = None if device_id is None else feature_names(report[key], device_id)
    backend = report["backend_features"]
    report["backend_feature_names"] = None if backend is None else flags.describe(backend, BackendFeature)
    return report


def _optional(node: str, query: str, ask: Callable[[], T]) -> T | None:
    """The answer, or None when the device or kernel does not support the query."""
    try:
        return ask()
    except NotSupportedError as error:
        log.debug("info.unsupported", node=node, query=query, errno=errno.errorcode.get(error.errno, error.errno))
        return None


def _per_queue(node: str, query: str, vqs: int | None, ask: Callable[[int], int]) -> list[int] | None:
    if vqs is None:
        return None
    return _optional(node, query, lambda: [ask(index) for index in range(vqs)])


def _vdpa_name(node: str) -> str | None:
    try:
        return device_of_node(node)
    except (OSError, LookupError):
        return None  # a node that is not (or no longer) on the vdpa bus still answers its ioctls


def read_through_fd(node: str, dev: VhostVdpa) -> dict[str, Any]:
    log.debug("info.path", node=node, path="fd")
    dev.set_owner()  # the vhost-vdpa ioctls below need an owner; a node that refuses it is no vhost-vdpa device
    vqs = _optional(node, "GET_VQS_COUNT", dev.get_vqs_count)
    iova = _optional(node, "GET_IOVA_RANGE", dev.get_iova_range)
    backend = _optional(node, "GET_BACKEND_FEATURES", dev.get_backend_features)
    return _report(
        node, device=_vdpa_name(node), source="fd",
        device_id=_optional(node, "GET_DEVICE_ID", dev.get_device_id),
        features=_optional(node, "GET_FEATURES", dev.get_features),
        backend_features=None if backend is None else int(backend),
        vqs=vqs,
        vq_groups=_per_queue(node, "GET_VRING_GROUP", vqs, dev.get_vring_group),
        vring_sizes=_per_queue(node, "GET_VRING_SIZE", vqs, dev.get_vring_size),
        groups=_optional(node, "GET_GROUP_NUM", dev.get_group_num),
        address_spaces=_optional(node, "GET_AS_NUM", dev.get_as_num),
        vring_num_max=_optional(node, "GET_VRING_NUM", dev.get_vring_num),
        config_size=_optional(node, "GET_CONFIG_SIZE", dev.get_config_size),
        iova_range=None if iova is None else [iova.first, iova.last],
    )


def read_through_netlink(node: str, busy: OSError) -> dict[str, Any]:
    """What DEV_GET and DEV_CONFIG_GET know of the device behind a node someone else holds open."""
    name = _vdpa_name(node)
    if name is None:
        busy.add_note(f"{node} is not the node of any device on the vdpa bus: netlink cannot stand in")
        raise busy
    pids = holders(node)
    log.debug("info.path", node=node, path="netlink", device=name, held_by=pids, reason=busy.strerror)
    with VdpaNetlink() as nl:
        device = nl.device(name)
        config = nl.config(name)
    return _report(node, device=name, source="netlink", held_by=pids, device_id=device.device_id,
                   features=config.features, negotiated_features=config.negotiated_features,
                   vqs=device.max_vqs, vring_num_max=device.max_vq_size)


def read_info(node: str) -> dict[str, Any]:
    try:
        dev = VhostVdpa(node)
    except OSError as error:
        if error.errno != errno.EBUSY:
            raise
        return read_through_netlink(node, error)
    with dev:
        return read_through_fd(node, dev)


def _held_note(report: dict[str, Any]) -> str:
    pids = report["held_by"]
    holder = f"pid {', '.join(map(str, pids))}" if pids else "another process"
    mine = " (this process)" if pids == [os.getpid()] else ""
    return (f"vdpad: {report['node']} is open by {holder}{mine}; showing what netlink knows of vdpa device "
            f"{report['device']} (- marks what only the node's fd can tell)")


@click.command()
@click.argument("node", type=click.Path(dir_okay=False))
@json_option
@reports_errors
def info(node: str, as_json: bool) -> None:
    """What the vhost-vdpa device at NODE offers (opens it, takes ownership, reads).

    Queries the device does not support show as - (null in JSON). While
    another process holds NODE open, shows what netlink knows instead.
    """
    report = read_info(node)
    if report["source"] == "netlink":
        click.echo(_held_note(report), err=True)
    if as_json:
        emit_json(report)
        return
    shown = dict(report, **{key: None if report[key] is None else f"{report[key]:#x}" for key in _HEX_FIELDS})
    if report["iova_range"] is not None:
        shown["iova_range"] = "{:#x}-{:#x}".format(*report["iova_range"])
    click.echo(fields(list(shown.items())))
