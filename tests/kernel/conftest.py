"""Fixtures for tests that drive real vhost devices inside the VM."""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

SIM_MODULES = ("vhost_vdpa", "vhost_net", "vdpa_sim_net", "vdpa_sim_blk")
VDPA_BUS = Path("/sys/bus/vdpa")
_names = itertools.count()


@dataclass(frozen=True)
class SimDevice:
    """A vdpa_sim device bound to vhost_vdpa."""

    name: str
    mgmtdev: str
    node: Path  # /dev/vhost-vdpa-N


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")


@pytest.fixture(scope="session")
def sim_modules() -> None:
    _run("modprobe", "-a", *SIM_MODULES)


def _wait_for(path: Path, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {path} did not appear within {timeout} s")
        time.sleep(0.02)


def _bind_vhost_vdpa(name: str) -> Path:
    device = VDPA_BUS / "devices" / name
    driver = device / "driver"
    if driver.exists() and driver.resolve().name != "vhost_vdpa":
        (driver / "unbind").write_text(name)
    if not driver.exists():
        (device / "driver_override").write_text("vhost_vdpa")
        (VDPA_BUS / "drivers" / "vhost_vdpa" / "bind").write_text(name)
    nodes = []
    deadline = time.monotonic() + 5
    while not nodes and time.monotonic() < deadline:
        nodes = sorted(device.glob("vhost-vdpa-*"))
        if not nodes:
            time.sleep(0.02)
    if not nodes:
        raise TimeoutError(f"{name} has no vhost-vdpa-N child after binding")
    node = Path("/dev") / nodes[0].name
    _wait_for(node, f"device node of {name}")  # no udev in the VM: devtmpfs only
    return node


@pytest.fixture
def sim_device(sim_modules):
    """A factory: sim_device("vdpasim_net") -> a fresh device, deleted after the test."""
    made: list[str] = []

    def make(mgmtdev: str) -> SimDevice:
        name = f"t{os.getpid() % 1000}x{next(_names)}"
        _run("vdpa", "dev", "add", "name", name, "mgmtdev", mgmtdev)
        made.append(name)
        return SimDevice(name, mgmtdev, _bind_vhost_vdpa(name))

    yield make
    for name in made:
        _run("vdpa", "dev", "del", name)


@pytest.fixture
def vdpa_net(sim_device) -> SimDevice:
    return sim_device("vdpasim_net")


@pytest.fixture
def vdpa_blk(sim_device) -> SimDevice:
    return sim_device("vdpasim_blk")


@pytest.fixture
def vhost_net_node(sim_modules) -> Iterator[Path]:
    node = Path("/dev/vhost-net")
    _wait_for(node, "vhost-net")
    yield node
