"""The device layer: one class per vhost fd kind, typed methods, no policy."""

from vdpad.device.errors import InvalidArgument, NotSupportedError, VhostError
from vdpad.device.fd import VhostFd, VringAddr
from vdpad.device.flags import BackendFeature, BlkFeature, DeviceStatus, NetFeature, VirtioFeature
from vdpad.device.iotlb_msg import Access, IotlbMessage, MessageType, Version
from vdpad.device.vdpa import IovaRange, VhostVdpa

__all__ = [
    "Access", "BackendFeature", "BlkFeature", "DeviceStatus", "InvalidArgument", "IotlbMessage",
    "IovaRange", "MessageType", "NetFeature", "NotSupportedError", "Version", "VhostError",
    "VhostFd", "VhostVdpa", "VirtioFeature", "VringAddr",
]
