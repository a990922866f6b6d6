"""The vdpa_sim rig shared by the kernel tests and the restart benchmark, inside the VM.

vdpa_sim's module parameters (use_va, batch_mapping), devices made without
the pytest fixtures (the benchmark runs outside pytest), RLIMIT_MEMLOCK, and
distinct Ethernet frames that vdpa_sim's receive filter lets through.
"""

from __future__ import annotations

import gc
import os
import resource
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vdpad import log
from vdpad.iotlb import PAGE_SIZE
from vdpad.mgmt import Busy, Driver, NotFound, VdpaNetlink, attach, detach

SIM_PARAMETERS = Path("/sys/module/vdpa_sim/parameters")
BLK_PARAMETERS = Path("/sys/module/vdpa_sim_blk/parameters")
VDPA_DEVICES = Path("/sys/bus/vdpa/devices")
BROADCAST = b"\xff" * 6
ETHERTYPE_EXPERIMENTAL = 0x88B5  # IEEE 802 local experimental: no stack claims it
DEFAULTS = {"use_va": True, "batch_mapping": True}


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")


def sim_parameters() -> dict[str, bool]:
    # use_va is a bool parameter (Y/N), batch_mapping an int (1/0).
    return {name: (SIM_PARAMETERS / name).read_text().strip() in ("Y", "1") for name in DEFAULTS}


def load_sim(**parameters: bool) -> None:
    """(Re)load vdpa_sim and its net and blk devices with these parameters (others at their
    defaults); no sim device may exist."""
    wanted = {**DEFAULTS, **parameters}
    if SIM_PARAMETERS.exists() and sim_parameters() == wanted:
        return
    if VDPA_DEVICES.exists() and any(VDPA_DEVICES.iterdir()):
        raise RuntimeError(f"cannot reload vdpa_sim: devices exist ({sorted(p.name for p in VDPA_DEVICES.iterdir())})")
    _run("modprobe", "-r", "vdpa_sim_net", "vdpa_sim_blk", "vdpa_sim")
    _run("modprobe", "vdpa_sim", *(f"{name}={int(value)}" for name, value in wanted.items()))
    _run("modprobe", "-a", "vhost_vdpa", "vdpa_sim_net", "vdpa_sim_blk")
    if sim_parameters() != wanted:
        raise RuntimeError(f"vdpa_sim has {sim_parameters()} after reloading it with {wanted}")


@contextmanager
def blk_shared_backend() -> Iterator[None]:
    """vdpa_sim_blk with shared_backend=1 for the duration: every blk device reads and writes one RAM disk,
    as two hosts share a migrated guest's storage; no blk device may exist at either end."""
    _reload_blk(shared_backend=True)
    try:
        yield
    finally:
        _reload_blk(shared_backend=False)


def _reload_blk(shared_backend: bool) -> None:
    _run("modprobe", "-r", "vdpa_sim_blk")
    _run("modprobe", "vdpa_sim_blk", f"shared_backend={int(shared_backend)}")
    seen = BLK_PARAMETERS.joinpath("shared_backend").read_text().strip() in ("Y", "1")
    if seen != shared_backend:
        raise RuntimeError(f"vdpa_sim_blk has shared_backend={seen} after reloading it with {shared_backend}")


@contextmanager
def memlock(limit: int) -> Iterator[None]:
    """RLIMIT_MEMLOCK at `limit` bytes (PA mode pins mapped pages against it), restored after."""
    infinity = resource.RLIM_INFINITY
    old = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    hard = old[1] if old[1] == infinity or (limit != infinity and old[1] >= limit) else limit
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, old)


@contextmanager
def sim_mode(**parameters: bool) -> Iterator[None]:
    """vdpa_sim with these parameters for the duration (PA mode, use_va=False, with an unlimited
    memlock), then at its defaults again."""
    load_sim(**parameters)
    try:
        with memlock(resource.RLIM_INFINITY):
            yield
    finally:
        load_sim()


@contextmanager
def vdpa_device(name: str, mgmtdev: str) -> Iterator[Path]:
    """A vdpa_sim device attached to vhost_vdpa by vdpad.mgmt: its /dev/vhost-vdpa-N node; detached after."""
    with VdpaNetlink() as nl:
        node = attach(nl, name, mgmtdev, driver=Driver.VHOST_VDPA).binding.node
        try:
            yield node
        finally:
            try:
                detach(nl, name)
            except NotFound:
                pass  # the user removed it already
            except Busy:
                gc.collect()  # a failed test's traceback may still hold an open VhostVdpa
                detach(nl, name)


def iova_far_from_us(iova_range, size: int) -> int:
    """A page-aligned IOVA for `size` bytes inside the device's range, as far above this process's
    own addresses as the range allows: a device that fell back to a 1:1 map (VA mode) finds
    nothing of ours there. Devices with a 39-bit range (VDUSE, many IOMMUs) get their top."""
    far = 0x7000_0000_0000
    top = (iova_range.last + 1 - size) & ~(PAGE_SIZE - 1)
    iova = max(min(far, top), -(-iova_range.first // PAGE_SIZE) * PAGE_SIZE)
    if iova + size - 1 > iova_range.last:
        raise ValueError(f"{size:#x} bytes do not fit the device's IOVA range {iova_range}")
    return iova


def frames(count: int, *, dst: bytes = BROADCAST, src: bytes = b"\x02\x00\x00\x00\x00\x01",
           seed: int = 0) -> list[bytes]:
    """`count` distinct frames of varied lengths: `seed`, a sequence number and random bytes in each."""
    out = []
    for number in range(count):
        payload = struct.pack("<II", seed, number) + os.urandom(46 + (number * 37 + seed) % 1400)
        out.append(dst + src + struct.pack("!H", ETHERTYPE_EXPERIMENTAL) + payload)
    return out


@contextmanager
def debug_logging() -> Iterator[None]:
    """structlog at debug level, so every ioctl and IOTLB write is an event (capture_logs sees them).

    Loggers bind their level when a device is opened: open devices inside.
    """
    log.configure("debug")
    try:
        yield
    finally:
        log.configure()
