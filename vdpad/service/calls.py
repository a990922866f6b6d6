"""The device calls a session forwards to its vhost-vdpa fd: one table for the daemon and the client.

Each is op `device.<name>` with the arguments of the VhostVdpa method of the
same name (a VringAddr as desc/avail/used; an fd as the index of a passed fd,
or null to unbind). The daemon checks every argument against this table; the
client builds its session device (vdpad.client.SessionDevice) from it, so the
virtio driver calls the same methods over either transport.
"""

from __future__ import annotations

from dataclasses import dataclass

# Argument types by name: every other argument is an unsigned integer.
BOOL_ARGS = frozenset({"enabled"})
FD_ARGS = frozenset({"fd"})  # a passed eventfd, or null: unbind
BYTES_ARGS = frozenset({"data"})  # hex in JSON


@dataclass(frozen=True)
class DeviceCall:
    args: tuple[str, ...] = ()
    result: str = "none"  # none | int | bytes (hex in JSON) | range ({"first", "last"})


DEVICE_CALLS: dict[str, DeviceCall] = {
    "get_device_id": DeviceCall(result="int"),
    "get_features": DeviceCall(result="int"),
    "set_features": DeviceCall(("features",)),
    "get_status": DeviceCall(result="int"),
    # Status 0 resets through the session's IOTLB engine: the maps are kept (IOTLB_PERSIST) or replayed.
    "set_status": DeviceCall(("status",)),
    "get_config_size": DeviceCall(result="int"),
    "get_config": DeviceCall(("offset", "length"), "bytes"),
    "set_config": DeviceCall(("offset", "data")),
    "get_vqs_count": DeviceCall(result="int"),
    "get_vring_num": DeviceCall(result="int"),
    "get_vring_size": DeviceCall(("index",), "int"),
    "get_vring_group": DeviceCall(("index",), "int"),
    "get_iova_range": DeviceCall(result="range"),
    "set_vring_num": DeviceCall(("index", "num")),
    "set_vring_addr": DeviceCall(("index", "desc", "avail", "used")),
    "set_vring_base": DeviceCall(("index", "base")),
    "get_vring_base": DeviceCall(("index",), "int"),
    "set_vring_enable": DeviceCall(("index", "enabled")),
    "set_vring_kick": DeviceCall(("index", "fd")),
    "set_vring_call": DeviceCall(("index", "fd")),
    "set_config_call": DeviceCall(("fd",)),
    "suspend": DeviceCall(),
    "resume": DeviceCall(),
}
