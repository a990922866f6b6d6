"""What the traffic tests and the restart benchmark share inside the VM.

vdpa_sim's address mode (module parameter use_va), devices made without the
pytest fixtures (the benchmark runs outside pytest), and distinct Ethernet
frames that vdpa_sim's receive filter lets through.
"""

from __future__ import annotations

import os
import resource
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vdpad import log

SIM_PARAMETERS = Path("/sys/module/vdpa_sim/parameters")
VDPA_DEVICES = Path("/sys/bus/vdpa/devices")
BROADCAST = b"\xff" * 6
ETHERTYPE_EXPERIMENTAL = 0x88B5  # IEEE 802 local experimental: no stack claims it


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")


def sim_uses_va() -> bool:
    return (SIM_PARAMETERS / "use_va").read_text().strip() == "Y"


def load_sim(*, use_va: bool) -> None:
    """(Re)load vdpa_sim and its net and blk devices in VA or PA mode; no sim device may exist."""
    if SIM_PARAMETERS.exists() and sim_uses_va() == use_va:
        return
    if VDPA_DEVICES.exists() and any(VDPA_DEVICES.iterdir()):
        raise RuntimeError(f"cannot reload vdpa_sim: devices exist ({sorted(p.name for p in VDPA_DEVICES.iterdir())})")
    _run("modprobe", "-r", "vdpa_sim_net", "vdpa_sim_blk", "vdpa_sim")
    _run("modprobe", "vdpa_sim", f"use_va={int(use_va)}")
    _run("modprobe", "-a", "vhost_vdpa", "vdpa_sim_net", "vdpa_sim_blk")
    if sim_uses_va() != use_va:
        raise RuntimeError(f"vdpa_sim still has use_va={sim_uses_va()} after reloading it")


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
def sim_mode(*, use_va: bool) -> Iterator[None]:
    """vdpa_sim in the given mode for the duration (PA mode with an unlimited memlock), then VA again."""
    load_sim(use_va=use_va)
    try:
        with memlock(resource.RLIM_INFINITY):
            yield
    finally:
        load_sim(use_va=True)


@contextmanager
def vdpa_device(name: str, mgmtdev: str) -> Iterator[Path]:
    """A vdpa_sim device bound to vhost_vdpa: its /dev/vhost-vdpa-N node; deleted after."""
    _run("vdpa", "dev", "add", "name", name, "mgmtdev", mgmtdev)
    try:
        device = VDPA_DEVICES / name
        driver = device / "driver"
        if driver.exists() and driver.resolve().name != "vhost_vdpa":
            (driver / "unbind").write_text(name)
            (device / "driver_override").write_text("vhost_vdpa")
            (VDPA_DEVICES.parent / "drivers" / "vhost_vdpa" / "bind").write_text(name)
        deadline = time.monotonic() + 5
        while not (nodes := sorted(device.glob("vhost-vdpa-*"))) or not (Path("/dev") / nodes[0].name).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: no /dev/vhost-vdpa-N within 5 s")
            time.sleep(0.02)
        yield Path("/dev") / nodes[0].name
    finally:
        _run("vdpa", "dev", "del", name)


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
