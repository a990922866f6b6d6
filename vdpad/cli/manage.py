"""`vdpad mgmtdev`, `vdpad dev`, `vdpad attach`, `vdpad detach`: thin over vdpad.mgmt."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click

from vdpad.cli.daemon import daemon_client, socket_option
from vdpad.cli.output import emit_json, fields, json_option, reports_errors, table
from vdpad.device import flags
from vdpad.device.flags import VirtioDeviceId, parse_features
from vdpad.mgmt import binding, lifecycle, model
from vdpad.mgmt.binding import Binding, Driver
from vdpad.mgmt.errors import NotFound
from vdpad.mgmt.model import DeviceConfig, MgmtDev, QueueStats
from vdpad.mgmt.netlink import VdpaNetlink
from vdpad.mgmt.records import device_record

direct_option = click.option("--direct", is_flag=True,
                             help="do it in this process even when a daemon answers on its socket")

class Features(click.ParamType):
    """A 64-bit feature mask: a number (0x..., 0b..., decimal) or names (VERSION_1,MAC,net.MQ)."""

    name = "features"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_features(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


def feature_names(features: int | None, device_id: int) -> list[str] | None:
    if features is None:
        return None
    kinds = {VirtioDeviceId.NET: (flags.NetFeature,), VirtioDeviceId.BLOCK: (flags.BlkFeature,)}.get(device_id, ())
    return flags.describe(features, flags.VirtioFeature, *kinds)


def _hex(value: int | None) -> str | None:
    return None if value is None else f"{value:#x}"


# -- records as JSON-ready dicts ---------------------------------------------------
def mgmtdev_record(m: MgmtDev) -> dict[str, Any]:
    kinds = ([flags.NetFeature] if VirtioDeviceId.NET in m.classes
             else [flags.BlkFeature] if VirtioDeviceId.BLOCK in m.classes else [])
    return {
        "mgmtdev": m.handle, "bus": m.bus, "name": m.name,
        "classes": [model.class_name(c) for c in m.classes], "max_vqs": m.max_vqs,
        "supported_features": m.supported_features,
        "supported_feature_names": flags.describe(m.supported_features, flags.VirtioFeature, *kinds),
    }


def config_record(c: DeviceConfig) -> dict[str, Any]:
    record: dict[str, Any] = {
        "name": c.name, "class": model.class_name(c.device_id), "device_id": c.device_id,
        "features": c.features, "feature_names": feature_names(c.features, c.device_id),
        "negotiated_features": c.negotiated_features,
        "negotiated_feature_names": feature_names(c.negotiated_features, c.device_id),
    }
    if c.net is not None:
        record["net"] = asdict(c.net) | {"link_up": c.net.link_up, "announce": c.net.announce}
    if c.blk is not None:
        record["blk"] = asdict(c.blk)
    return record


def stats_record(s: QueueStats) -> dict[str, Any]:
    return {
        "name": s.name, "queue": s.queue_index, "queue_type": s.queue_type, "device_id": s.device_id,
        "negotiated_features": s.negotiated_features, "max_vq_pairs": s.max_vq_pairs,
        "counters": dict(s.counters),
    }


def _binding_or_none(name: str) -> Binding | None:
    try:
        return binding.binding_of(name)
    except NotFound:  # on the netlink bus but not in our sysfs (another network namespace's view)
        return None


# -- vdpad mgmtdev --------------------------------------------------------------
@click.group()
def mgmtdev() -> None:
    """Management devices: what can create vdpa devices."""


@mgmtdev.command("list")
@json_option
@reports_errors
def mgmtdev_list(as_json: bool) -> None:
    """Every management device (MGMTDEV_GET dump)."""
    with VdpaNetlink() as nl:
        records = [mgmtdev_record(m) for m in nl.mgmtdevs()]
    if as_json:
        emit_json(records)
        return
    rows = [r | {"supported_features": _hex(r["supported_features"])} for r in records]
    click.echo(table(rows, [("mgmtdev", "MGMTDEV"), ("classes", "CLASSES"), ("max_vqs", "MAX_VQS"),
                            ("supported_features", "FEATURES")]))


@mgmtdev.command("show")
@click.argument("handle")
@json_option
@reports_errors
def mgmtdev_show(handle: str, as_json: bool) -> None:
    """One management device, NAME or BUS/NAME (MGMTDEV_GET)."""
    with VdpaNetlink() as nl:
        record = mgmtdev_record(nl.mgmtdev(handle))
    if as_json:
        emit_json(record)
        return
    record["supported_features"] = _hex(record["supported_features"])
    click.echo(fields(list(record.items())))


# -- vdpad dev ----------------------------------------------------------------------
@click.group()
def dev() -> None:
    """vdpa devices: list, show, config, stats, set."""


@dev.command("list")
@json_option
@reports_errors
def dev_list(as_json: bool) -> None:
    """Every vdpa device (DEV_GET dump) and the driver it is bound to."""
    with VdpaNetlink() as nl:
        records = [device_record(d, _binding_or_none(d.name)) for d in nl.devices()]
    if as_json:
        emit_json(records)
        return
    for r in records:
        r["bound"] = r["node"] or ",".join([r["virtio"] or "", *r["kernel_devices"]]).strip(",") or None
    click.echo(table(records, [("name", "NAME"), ("mgmtdev", "MGMTDEV"), ("class", "CLASS"),
                               ("vendor_id", "VENDOR"), ("max_vqs", "MAX_VQS"), ("max_vq_size", "VQ_SIZE"),
                               ("driver", "DRIVER"), ("bound", "NODE")]))


@dev.command("show")
@click.argument("name")
@json_option
@reports_errors
def dev_show(name: str, as_json: bool) -> None:
    """One device (DEV_GET) and its binding."""
    with VdpaNetlink() as nl:
        record = device_record(nl.device(name), _binding_or_none(name))
    if as_json:
        emit_json(record)
        return
    click.echo(fields(list(record.items())))


@dev.command("config")
@click.argument("name", required=False)
@json_option
@reports_errors
def dev_config(name: str | None, as_json: bool) -> None:
    """The config space of NAME, or of every device (DEV_CONFIG_GET): net and blk decoded."""
    with VdpaNetlink() as nl:
        records = [config_record(c) for c in ([nl.config(name)] if name else nl.configs())]
    if as_json:
        emit_json(records[0] if name else records)
        return
    click.echo("\n\n".join(_config_text(r) for r in records))


def _config_text(record: dict[str, Any]) -> str:
    items: list[tuple[str, Any]] = [("name", record["name"]), ("class", record["class"]),
                                    ("features", _hex(record["features"])),
                                    ("feature_names", record["feature_names"]),
                                    ("negotiated_features", _hex(record["negotiated_features"])),
                                    ("negotiated_feature_names", record["negotiated_feature_names"])]
    for section in ("net", "blk"):
        items += list(record.get(section, {}).items())
    return fields(items)


@dev.command("stats")
@click.argument("name")
@click.option("--queue", "-q", type=int, required=True, help="virtqueue index")
@json_option
@reports_errors
def dev_stats(name: str, queue: int, as_json: bool) -> None:
    """A queue's vendor counters (DEV_VSTATS_GET); needs a driver past feature negotiation."""
    with VdpaNetlink() as nl:
        record = stats_record(nl.vstats(name, queue))
    if as_json:
        emit_json(record)
        return
    counters = record.pop("counters")
    record["negotiated_features"] = _hex(record["negotiated_features"])
    click.echo(fields(list(record.items()) + list(counters.items())))


@dev.command("set")
@click.argument("name")
@click.option("--mac", required=True, help="new MAC address of a net device")
@reports_errors
def dev_set(name: str, mac: str) -> None:
    """Change a device attribute (DEV_ATTR_SET): the MAC address of a net device."""
    with VdpaNetlink() as nl:
        nl.set_mac(name, mac)


# -- vdpad attach / detach ----------------------------------------------------------
@click.command()
@click.argument("name")
@click.option("--mgmtdev", "-m", required=True, help="management device, NAME or BUS/NAME")
@click.option("--mac", help="net: MAC address (aa:bb:cc:dd:ee:ff, unicast)")
@click.option("--mtu", type=int, help="net: MTU (68-65535)")
@click.option("--max-vqp", type=int, help="net: queue pairs (1-32768)")
@click.option("--features", type=Features(), help="device features to offer: a mask (0x...) or names (VERSION_1,ACCESS_PLATFORM,MAC)")
@click.option("--driver", type=click.Choice([d.value for d in Driver]), default=Driver.VHOST_VDPA.value,
              show_default=True, help="driver to bind the new device to")
@click.option("--timeout", type=click.FloatRange(min=0), default=binding.DEFAULT_TIMEOUT, show_default=True,
              help="seconds to wait for the driver's device node")
@direct_option
@socket_option
@json_option
@reports_errors
def attach(name: str, mgmtdev: str, mac: str | None, mtu: int | None, max_vqp: int | None,
           features: int | None, driver: str, timeout: float, direct: bool, socket_path: str | None,
           as_json: bool) -> None:
    """Create device NAME on a management device, bind it and print its node.

    Prints /dev/vhost-vdpa-N (vhost_vdpa), or the netdev/disk the kernel made
    (virtio_vdpa). On any failure the new device is deleted again. Through the
    daemon when one answers on its socket, else (or with --direct) here.
    """
    lifecycle.check_attach(name, mgmtdev, mac=mac, mtu=mtu, max_vqp=max_vqp, features=features)
    daemon = None if direct else daemon_client(socket_path)
    if daemon is not None:
        with daemon:
            record = daemon.attach(name, mgmtdev, mac=mac, mtu=mtu, max_vqp=max_vqp, features=features,
                                   driver=driver, timeout=timeout)
    else:
        with VdpaNetlink() as nl:
            done = lifecycle.attach(nl, name, mgmtdev, mac=mac, mtu=mtu, max_vqp=max_vqp, features=features,
                                    driver=Driver(driver), timeout=timeout)
        record = device_record(done.device, done.binding)
    if as_json:
        emit_json(record)
        return
    made = record["node"] or " ".join(record["kernel_devices"]) or record["virtio"]
    click.echo(made)


@click.command()
@click.argument("name")
@direct_option
@socket_option
@reports_errors
def detach(name: str, direct: bool, socket_path: str | None) -> None:
    """Unbind device NAME from its driver and delete it (refused while its node is open, or a daemon's
    session holds it). Through the daemon when one answers on its socket, else (or with --direct) here."""
    daemon = None if direct else daemon_client(socket_path)
    if daemon is not None:
        with daemon:
            daemon.detach(name)
        return
    with VdpaNetlink() as nl:
        lifecycle.detach(nl, name)
