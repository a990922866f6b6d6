"""`vdpad mgmtdev`, `vdpad dev`, `vdpad attach`, `vdpad detach`: thin over vdpad.mgmt."""

from __future__ import annotations

import enum
from dataclasses import asdict
from typing import Any

import click

from vdpad.cli.output import emit_json, fields, reports_errors, table
from vdpad.device import flags
from vdpad.device.flags import VirtioDeviceId
from vdpad.mgmt import binding, lifecycle, model
from vdpad.mgmt.binding import Binding, Driver
from vdpad.mgmt.errors import NotFound
from vdpad.mgmt.model import Device, DeviceConfig, MgmtDev, QueueStats
from vdpad.mgmt.netlink import VdpaNetlink

json_option = click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")

# What a --features name may be: "" (no prefix) looks in every kind.
_FEATURE_KINDS: dict[str, tuple[type[enum.IntFlag], ...]] = {
    "": (flags.VirtioFeature, flags.NetFeature, flags.BlkFeature),
    "net": (flags.VirtioFeature, flags.NetFeature),
    "blk": (flags.VirtioFeature, flags.BlkFeature),
}


def parse_features(text: str) -> int:
    """A feature mask from a number (0x.., 0b.., decimal) or names joined by commas.

    Names are those describe() prints (VERSION_1, MAC, FLUSH, bit40); one that
    net and blk both define with different bits (MQ) takes a prefix: net.MQ, blk.MQ.
    """
    text = text.strip()
    try:
        value = int(text, 0)
    except ValueError:
        pass
    else:
        if not 0 <= value < 1 << 64:
            raise ValueError(f"features {text!r} does not fit in 64 bits")
        return value
    mask = 0
    for word in filter(None, (w.strip() for w in text.split(","))):
        kind, _, name = word.rpartition(".")
        if kind.lower() not in _FEATURE_KINDS:
            raise ValueError(f"feature {word!r}: prefix {kind!r} is not net or blk")
        mask |= _feature_bit(name.upper(), kind.lower(), word)
    if not mask:
        raise ValueError(f"no feature in {text!r}: give a number (0x...) or names (VERSION_1,MAC)")
    return mask


def _feature_bit(name: str, kind: str, word: str) -> int:
    if name.startswith("BIT") and name[3:].isdigit() and int(name[3:]) < 64:
        return 1 << int(name[3:])
    bits = {int(k[name]) for k in _FEATURE_KINDS[kind] if name in k.__members__}
    if not bits:
        raise ValueError(f"unknown feature {word!r} (names as `vdpad mgmtdev list` prints them, or bitN)")
    if len(bits) > 1:
        raise ValueError(f"feature {word!r} means different bits for net and blk: write net.{name} or blk.{name}")
    return bits.pop()


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


def device_record(d: Device, bound: Binding | None) -> dict[str, Any]:
    record = asdict(d)
    record["class"] = model.class_name(d.device_id)
    record["driver"] = bound.driver if bound else None
    record["node"] = str(bound.node) if bound and bound.node else None
    record["virtio"] = bound.virtio if bound else None
    record["kernel_devices"] = list(bound.kernel_devices) if bound else []
    return record


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
@json_option
@reports_errors
def attach(name: str, mgmtdev: str, mac: str | None, mtu: int | None, max_vqp: int | None,
           features: int | None, driver: str, timeout: float, as_json: bool) -> None:
    """Create device NAME on a management device, bind it and print its node.

    Prints /dev/vhost-vdpa-N (vhost_vdpa), or the netdev/disk the kernel made
    (virtio_vdpa). On any failure the new device is deleted again.
    """
    lifecycle.check_attach(name, mgmtdev, mac=mac, mtu=mtu, max_vqp=max_vqp, features=features)
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
@reports_errors
def detach(name: str) -> None:
    """Unbind device NAME from its driver and delete it (refused while its node is open)."""
    with VdpaNetlink() as nl:
        lifecycle.detach(nl, name)
