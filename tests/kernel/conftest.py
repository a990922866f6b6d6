"""Fixtures for tests that drive real vhost devices inside the VM."""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.device_calls import CallRecorder
from tests.sim import vdpa_device
from tests.vduse import VduseBlk, load_vduse, vduse_blk
from vdpad.mgmt.netlink import VdpaNetlink

pytestmark = pytest.mark.kernel

SIM_MODULES = ("vhost_vdpa", "vhost_net", "vdpa_sim_net", "vdpa_sim_blk")
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


@pytest.fixture
def sim_device(sim_modules):
    """A factory: sim_device("vdpasim_net") -> a fresh device bound to vhost_vdpa, deleted after the test."""
    with ExitStack() as made:
        def make(mgmtdev: str) -> SimDevice:
            name = f"t{os.getpid() % 1000}x{next(_names)}"
            return SimDevice(name, mgmtdev, made.enter_context(vdpa_device(name, mgmtdev)))

        yield make


@pytest.fixture
def nl(sim_modules) -> Iterator[VdpaNetlink]:
    with VdpaNetlink() as netlink:
        yield netlink


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


@pytest.fixture(scope="session")
def vduse_modules() -> None:
    load_vduse()


@pytest.fixture
def vduse_device(vduse_modules) -> Iterator[VduseBlk]:
    """A VDUSE virtio-blk device (qemu-storage-daemon, 16 MiB file) bound to vhost_vdpa; gone after the test."""
    with vduse_blk(f"vd{os.getpid() % 1000}x{next(_names)}") as device:
        yield device


# -- every public device method meets the kernel ----------------------------------
CALLS_CHECK = "test_device_calls.py"  # checks what the whole session called, so it runs last


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name == CALLS_CHECK)  # stable: the others keep their order


@pytest.fixture(scope="session", autouse=True)
def device_calls() -> Iterator[CallRecorder]:
    """The device classes' public methods, wrapped for the session to note which ones the tests call."""
    recorder = CallRecorder()
    recorder.install()
    yield recorder
    recorder.uninstall()
