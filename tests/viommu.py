"""The vIOMMU rig the kernel and systemd tests share: a domain over 1 MiB, page by page, and a vhost-net
session translating through it, driven by the userspace virtio driver over the session."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from tests.tap import Tap
from vdpad.client import Client, RemoteDomain, RemoteSession
from vdpad.iotlb import PAGE_SIZE, MemoryRegion, Perm
from vdpad.virtio import DmaArena, NetDriver

PAGES = 256  # 1 MiB: the vhost-net driver's half, then a vhost-vdpa driver's
HALF = PAGES // 2 * PAGE_SIZE


def page_by_page(domain: RemoteDomain, iova: int, first: int, count: int, perm: Perm = Perm.RW) -> list[dict]:
    """One mapping per page, alternating between two names of the same memory: nothing merges, so each
    page the device touches is a translation of its own (and a miss of its own)."""
    return [domain.map(iova + page * PAGE_SIZE, "ram-a" if page % 2 else "ram-b", page * PAGE_SIZE, PAGE_SIZE, perm)
            for page in range(first, first + count)]


@dataclass
class Rig:
    client: Client
    domain: RemoteDomain
    ram: MemoryRegion
    iova: int
    net: RemoteSession  # the vhost-net session
    driver: NetDriver
    tap: Tap

    def misses(self) -> dict:
        (found,) = [s for s in self.client.sessions() if s["session"] == self.net.number]
        return found["misses"]

    def entries(self) -> dict[int, dict]:
        return {e["iova"]: e for e in self.domain.show()["map"]}


@contextmanager
def net_rig(client: Client, tap: Tap, name: str, iova: int = 1 << 32) -> Iterator[Rig]:
    """A domain over 1 MiB, page by page, and a vhost-net session translating through it, started by the
    virtio driver in its first half."""
    with ExitStack() as stack:
        ram = stack.enter_context(MemoryRegion(PAGES * PAGE_SIZE, "ram"))
        domain = stack.enter_context(client.create_domain(name))
        domain.register(ram, "ram-a")
        domain.register(ram, "ram-b")
        domain.commit(page_by_page(domain, iova, 0, PAGES))
        net = stack.enter_context(client.open_vhost_net(tap.fd))
        domain.attach(net)
        arena = stack.enter_context(DmaArena(ram, iova, size=HALF))
        driver = stack.enter_context(NetDriver(net.device, arena))
        driver.start()
        yield Rig(client, domain, ram, iova, net, driver, tap)


def wait_for(what: str, check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)
    return found
