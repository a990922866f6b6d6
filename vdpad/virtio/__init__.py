"""A userspace virtio driver over vhost-vdpa: split rings in mapped memory, net and blk.

It exists to prove the IOTLB right with real traffic: a ring or buffer the
device cannot translate shows up as a frame or sector that never comes back.
"""

from vdpad.virtio.blk import BlkDriver, BlkIoError
from vdpad.virtio.dma import DmaArena, DmaBuffer
from vdpad.virtio.driver import DriverError, QueueSpec, VirtioDriver, Virtqueue, negotiate
from vdpad.virtio.net import NetDriver
from vdpad.virtio.ring import Buffer, RingFull, RingLayout, SplitRing, Used

__all__ = [
    "BlkDriver", "BlkIoError", "Buffer", "DmaArena", "DmaBuffer", "DriverError", "NetDriver", "QueueSpec",
    "RingFull", "RingLayout", "SplitRing", "Used", "VirtioDriver", "Virtqueue", "negotiate",
]
