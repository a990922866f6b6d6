"""A userspace virtio driver over vhost-vdpa: feature negotiation, status, vrings, notifications.

It drives the device exactly as a guest driver would (virtio 1.x, 3.1.1), with
vhost-vdpa ioctls for the transport: the rings live in memory the caller has
mapped into the device's IOTLB, kicks go through an eventfd per queue, and
the device signals a call eventfd per queue when it used buffers.

The ioctls go to a `Transport`: a VhostVdpa fd of the caller's own, or a
daemon session's device (vdpad.client.SessionDevice), which forwards each
call and passes the eventfds over the control socket.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from vdpad.device import (
    DeviceStatus, EventFd, NotSupportedError, VirtioDeviceId, VirtioFeature, VringAddr,
)
from vdpad.virtio.dma import DmaArena
from vdpad.virtio.ring import RingLayout, SplitRing, Used

log = structlog.get_logger("vdpad.virtio")

# vhost-vdpa serves only modern devices behind an IOTLB.
REQUIRED_FEATURES = VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM
RING_ALIGN = 4096  # rings start on a page of their own: easy to read in a trace


class Transport(Protocol):
    """The device calls a driver makes, with VhostVdpa's signatures (a VhostVdpa is one)."""

    path: str | os.PathLike[str]

    def get_device_id(self) -> int: ...
    def get_status(self) -> DeviceStatus: ...
    def set_status(self, status: DeviceStatus | int) -> None: ...
    def get_features(self) -> int: ...
    def set_features(self, features: int) -> None: ...
    def get_config(self, offset: int, length: int) -> bytes: ...
    def get_vring_num(self) -> int: ...
    def get_vring_size(self, index: int) -> int: ...
    def set_vring_num(self, index: int, num: int) -> None: ...
    def set_vring_addr(self, index: int, addr: VringAddr) -> None: ...
    def set_vring_base(self, index: int, base: int) -> None: ...
    def set_vring_kick(self, index: int, fd: int | None) -> None: ...
    def set_vring_call(self, index: int, fd: int | None) -> None: ...
    def set_vring_enable(self, index: int, enabled: bool) -> None: ...


class DriverError(RuntimeError):
    """The device did not behave as the driver needs (features, status, a queue that never answered)."""


def negotiate(offered: int, wanted: int, required: int = REQUIRED_FEATURES) -> int:
    """The features to ack: `wanted` (which includes `required`) as far as offered; all of `required` or an error."""
    missing = required & ~offered
    if missing:
        raise DriverError(f"device does not offer required features {missing:#x} (offered {offered:#x})")
    return (wanted | required) & offered


@dataclass(frozen=True)
class QueueSpec:
    """A queue the driver sets up: its index, size and the arena its ring and buffers come from."""

    index: int
    size: int
    arena: DmaArena


class Virtqueue:
    """One live queue: the split ring plus its kick and call eventfds."""

    def __init__(self, index: int, ring: SplitRing, kick_eventfd: EventFd, call_eventfd: EventFd):
        self.index, self.ring = index, ring
        self.kick_eventfd, self.call_eventfd = kick_eventfd, call_eventfd

    def kick(self) -> None:
        self.kick_eventfd.write(1)

    def wait_used(self, count: int, timeout: float) -> list[Used]:
        """Reap until `count` chains came back, sleeping on the call eventfd; DriverError after `timeout` s."""
        done: list[Used] = self.ring.reap()
        deadline = time.monotonic() + timeout
        while len(done) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DriverError(f"queue {self.index}: {len(done)} of {count} buffers used after {timeout} s "
                                  f"(avail {self.ring.avail_idx}, used {self.ring.used_idx})")
            # The call eventfd wakes us; the short cap also covers a device that used buffers without signalling.
            if self.call_eventfd.wait(min(left, 0.05)):
                try:
                    self.call_eventfd.read()
                except BlockingIOError:
                    pass
            done += self.ring.reap()
        return done


class VirtioDriver:
    """What every device type shares: bring-up from reset to DRIVER_OK over its queues.

    The device must be in reset when `start` is called (a fresh fd, or after
    the IOTLB engine's reset, which keeps or replays the maps): the driver
    never resets it itself, so it can never drop maps behind the engine's back.
    """

    device_id: VirtioDeviceId | None = None

    def __init__(self, dev: Transport):
        found = dev.get_device_id()
        if self.device_id is not None and found != self.device_id:
            raise DriverError(f"{dev.path} is virtio device {found}, not {int(self.device_id)} "
                              f"({self.device_id.name}, {type(self).__name__})")
        self.dev = dev
        self.features = 0
        self.queues: dict[int, Virtqueue] = {}
        self._eventfds: dict[int, tuple[EventFd, EventFd]] = {}
        self._ring_limits: dict[int, int] = {}  # asked in reset, so the answer never changes
        self._log = log.bind(device=dev.path)

    # -- bring-up ---------------------------------------------------------
    def _start(self, wanted: int, specs: Sequence[QueueSpec]) -> None:
        status = self.dev.get_status()
        if status != DeviceStatus.RESET:
            raise DriverError(f"{self.dev.path} has status {status!r}: reset it (through the IOTLB engine) first")
        for spec in specs:
            max_size = self._largest_ring(spec.index)
            if spec.size > max_size:
                raise DriverError(f"queue {spec.index}: size {spec.size} exceeds the device's {max_size}")
        self.queues = {}
        step = DeviceStatus.ACKNOWLEDGE
        self.dev.set_status(step)
        step |= DeviceStatus.DRIVER
        self.dev.set_status(step)
        self.features = negotiate(self.dev.get_features(), wanted)
        self.dev.set_features(self.features)
        step |= DeviceStatus.FEATURES_OK
        self.dev.set_status(step)
        if DeviceStatus.FEATURES_OK not in self.dev.get_status():
            self.dev.set_status(step | DeviceStatus.FAILED)
            raise DriverError(f"{self.dev.path} refused features {self.features:#x} (FEATURES_OK did not stick)")
        for arena in {id(spec.arena): spec.arena for spec in specs}.values():
            arena.reset()
        for spec in specs:
            self.queues[spec.index] = self._setup_queue(spec)
        self._prepare_buffers()
        # Rings are enabled before DRIVER_OK: valid with or without ENABLE_AFTER_DRIVER_OK.
        for index in self.queues:
            self.dev.set_vring_enable(index, True)
        self.dev.set_status(step | DeviceStatus.DRIVER_OK)
        self._log.debug("virtio.driver_ok", features=hex(self.features), queues=sorted(self.queues))
        self._kick_in_flight()

    def _kick_in_flight(self) -> None:
        """Kick every queue with buffers out: a device looks at a ring only when kicked."""
        for queue in self.queues.values():
            if queue.ring.in_flight:
                queue.kick()

    def _largest_ring(self, index: int) -> int:
        """The queue's own limit (GET_VRING_SIZE) where the device tells it, else the device-wide GET_VRING_NUM."""
        if index not in self._ring_limits:
            try:
                size, path = self.dev.get_vring_size(index), "GET_VRING_SIZE"
            except NotSupportedError:  # vdpa_sim with batch_mapping=1 (EOPNOTSUPP), older kernels (ENOTTY)
                size, path = self.dev.get_vring_num(), "GET_VRING_NUM"
            self._log.debug("virtio.ring_limit", queue=index, size=size, path=path)
            self._ring_limits[index] = size
        return self._ring_limits[index]

    def _setup_queue(self, spec: QueueSpec) -> Virtqueue:
        layout = RingLayout(spec.size)
        memory = spec.arena.alloc(layout.size, RING_ALIGN)
        ring = SplitRing(memory.view, spec.size)
        kick, call = self._eventfds.get(spec.index) or self._new_eventfds(spec.index)
        self.dev.set_vring_num(spec.index, spec.size)
        self.dev.set_vring_addr(spec.index, VringAddr(desc=memory.iova + layout.desc,
                                                      used=memory.iova + layout.used,
                                                      avail=memory.iova + layout.avail))
        self.dev.set_vring_base(spec.index, ring.avail_idx)
        self.dev.set_vring_kick(spec.index, kick.fileno())
        self.dev.set_vring_call(spec.index, call.fileno())
        return Virtqueue(spec.index, ring, kick, call)

    def _new_eventfds(self, index: int) -> tuple[EventFd, EventFd]:
        kick = EventFd(f"kick {index}", nonblocking=True)
        try:
            call = EventFd(f"call {index}", nonblocking=True)
        except BaseException:
            kick.close()
            raise
        self._eventfds[index] = (kick, call)
        return kick, call

    def _prepare_buffers(self) -> None:
        """Each device type takes its buffers from the fresh arenas here; receive buffers are queued before DRIVER_OK."""

    # -- migration (docs/migration.md) --------------------------------------
    def bind(self, dev: Transport) -> None:
        """Bind the queues' kick and call eventfds on `dev` too: a migration's destination, before its load
        (or this device after a reset, which forgets the call eventfds)."""
        for index, queue in self.queues.items():
            dev.set_vring_kick(index, queue.kick_eventfd.fileno())
            dev.set_vring_call(index, queue.call_eventfd.fileno())

    def carry_on(self, dev: Transport) -> None:
        """Drive `dev` from now on: it was loaded with this driver's queues (their sizes, addresses and the
        bases the old device had reached), so the rings, buffers and eventfds stay as they are. Every queue
        with buffers out is kicked: a device looks at a ring only when kicked."""
        self.dev = dev
        self._ring_limits = {}
        self._log = log.bind(device=dev.path)
        self._kick_in_flight()

    # -- life cycle -------------------------------------------------------
    def close(self) -> None:
        """Close the eventfds (the device fd and the memory are the caller's)."""
        for kick, call in self._eventfds.values():
            kick.close()
            call.close()
        self._eventfds.clear()
        self.queues = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
