"""Which driver a vdpa device is bound to, through sysfs (driver_override, bind, unbind).

vhost_vdpa gives userspace a /dev/vhost-vdpa-N; virtio_vdpa hands the device
to the kernel's own virtio drivers (a net device becomes a netdev, a blk
device a disk). Without udev (as in the test VM) nobody loads that virtio
driver nor makes device nodes: devtmpfs makes the nodes, and binding loads
the virtio driver by its modalias as udev would.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import structlog

from vdpad.mgmt.errors import Busy, ModuleMissing, NotFound, WaitTimeout, refused

log = structlog.get_logger("vdpad.mgmt")

VDPA_BUS = Path("/sys/bus/vdpa")
DEV = Path("/dev")
PROC = Path("/proc")
DEFAULT_TIMEOUT = 5.0
_POLL = 0.01
T = TypeVar("T")


class Driver(enum.StrEnum):
    VHOST_VDPA = "vhost_vdpa"
    VIRTIO_VDPA = "virtio_vdpa"


@dataclass(frozen=True)
class Binding:
    """A device's driver and what that driver made of it."""

    device: str
    driver: str | None  # None: bound to nothing
    node: Path | None = None  # vhost_vdpa: /dev/vhost-vdpa-N
    virtio: str | None = None  # virtio_vdpa: the virtio device, virtioN
    kernel_devices: tuple[str, ...] = ()  # virtio_vdpa: the netdevs or disks of the virtio driver


def _device_dir(name: str) -> Path:
    path = VDPA_BUS / "devices" / name
    if not path.is_dir():
        raise NotFound(errno.ENODEV, f"no vdpa device {name!r} on the bus ({path})")
    return path


def _driver_name(device_dir: Path) -> str | None:
    link = device_dir / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def require_driver(driver: Driver) -> Path:
    """The driver's sysfs directory; ModuleMissing (naming the module) when it is not loaded."""
    path = VDPA_BUS / "drivers" / driver
    if not path.is_dir():
        raise ModuleMissing(driver, f"the {driver} driver is not loaded")
    return path


def wait_until(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `check` until it returns something other than None (no udev to tell us)."""
    deadline = time.monotonic() + timeout
    while (found := check()) is None:
        if time.monotonic() >= deadline:
            raise WaitTimeout(errno.ETIMEDOUT, f"{what} did not appear within {timeout:g} s")
        time.sleep(_POLL)
    return found


def _write(path: Path, value: str, what: str) -> None:
    log.debug("sysfs", path=str(path), value=value)
    try:
        path.write_text(value)
    except OSError as error:
        reason = error.strerror
        if error.errno in (errno.EACCES, errno.EPERM):
            reason += ": writing to sysfs needs root"
        raise refused(error.errno, what, reason) from None


# -- what a device is bound to -------------------------------------------------
def _vhost_node(device_dir: Path) -> Path | None:
    """/dev/vhost-vdpa-N once devtmpfs made it as the char device sysfs names (major:minor)."""
    children = sorted(device_dir.glob("vhost-vdpa-*"))
    if not children:
        return None
    major, minor = (int(n) for n in (children[0] / "dev").read_text().split(":"))
    node = DEV / children[0].name
    try:
        st = node.stat()
    except FileNotFoundError:
        return None
    return node if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(major, minor) else None


def _virtio_child(device_dir: Path) -> Path | None:
    children = sorted(device_dir.glob("virtio[0-9]*"))
    return children[0] if children else None


def _kernel_devices(virtio_dir: Path) -> tuple[str, ...]:
    return tuple(sorted(p.name for kind in ("net", "block") for p in (virtio_dir / kind).glob("*")))


def binding_of(name: str) -> Binding:
    device_dir = _device_dir(name)
    driver = _driver_name(device_dir)
    if driver == Driver.VHOST_VDPA:
        return Binding(name, driver, node=_vhost_node(device_dir))
    if driver == Driver.VIRTIO_VDPA and (virtio := _virtio_child(device_dir)) is not None:
        return Binding(name, driver, virtio=virtio.name, kernel_devices=_kernel_devices(virtio))
    return Binding(name, driver)


# -- changing it -----------------------------------------------------------------
def bind(name: str, driver: Driver, timeout: float = DEFAULT_TIMEOUT) -> Binding:
    """Bind `name` to `driver` (unbinding another first) and wait for what the driver makes."""
    driver = Driver(driver)
    device_dir = _device_dir(name)
    driver_dir = require_driver(driver)
    current = _driver_name(device_dir)
    if current not in (None, driver):
        unbind(name)
    # The override keeps other drivers off it, also when the bus probes it again.
    override = device_dir / "driver_override"
    if override.read_text().strip() != driver:
        _write(override, driver, f"setting driver_override of {name} to {driver}")
    if current != driver:
        _write(driver_dir / "bind", name, f"binding {name} to {driver}")
    if driver == Driver.VHOST_VDPA:
        node = wait_until(lambda: _vhost_node(device_dir), timeout,
                          f"the vhost-vdpa node of {name} (is devtmpfs mounted on {DEV}?)")
        return Binding(name, driver.value, node=node)
    virtio = wait_until(lambda: _virtio_child(device_dir), timeout, f"the virtio device of {name}")
    if not (virtio / "driver").exists():
        _load_virtio_driver(virtio)
    return Binding(name, driver.value, virtio=virtio.name, kernel_devices=_kernel_devices(virtio))


def _load_virtio_driver(virtio: Path) -> None:
    """What udev does for a new virtio device: modprobe its modalias (virtio_net, virtio_blk...)."""
    alias = (virtio / "modalias").read_text().strip()
    log.debug("modprobe", alias=alias, device=virtio.name)
    proc = subprocess.run(["modprobe", "-q", "-b", alias], capture_output=True, text=True)
    if proc.returncode:
        log.warning("no virtio driver loaded", device=virtio.name, alias=alias, stderr=proc.stderr.strip())


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What a file is, whatever path reached it: a device node by its device number, any other file by its inode."""
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return (stat.S_IFMT(st.st_mode), st.st_rdev)
    return (stat.S_IFMT(st.st_mode), st.st_dev, st.st_ino)


def _is_target(path: Path, target: tuple[int, ...]) -> bool | None:
    """Whether the file `path` leads to is the target; None when it is gone or not ours to read."""
    try:
        return _identity(os.stat(path)) == target
    except OSError:
        return None


def _maps_it(pid_dir: Path, target: tuple[int, ...], seen: dict[tuple[int, int], bool]) -> bool:
    """Whether the process maps the file: a mapping outlives the fd it was made through.

    `seen` remembers, across processes, whether the file a maps line names by
    (device, inode) is the target, so each file is looked at once.
    """
    try:
        lines = (pid_dir / "maps").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        span, _perms, _offset, dev, inode = line.split(maxsplit=5)[:5]
        if inode == "0":
            continue  # anonymous memory
        major, minor = (int(n, 16) for n in dev.split(":"))
        key = (os.makedev(major, minor), int(inode))
        found = seen.get(key)
        if found is None:
            # map_files (readable by root) leads to the file itself, whatever node it was mapped through.
            found = _is_target(pid_dir / "map_files" / span, target)
            if found is not None:
                seen[key] = found
        if found:
            return True
    return False


def holders(node: Path) -> list[int]:
    """The processes that have `node` open or mapped (those whose /proc we may read).

    Matched by what the node is (a device number; for other files the inode),
    so the same device reached through another path (a second node, a bind
    mount, a symlink) counts, and so does a mapping whose fd was closed.
    """
    st = os.stat(node)
    target = _identity(st)
    # The node itself, as /proc/PID/maps names it: all an unprivileged reader can match.
    seen = {(st.st_dev, st.st_ino): True}
    pids = []
    for pid_dir in PROC.glob("[0-9]*"):
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:
            continue  # gone, or not ours to read
        if any(_is_target(fd, target) for fd in fds) or _maps_it(pid_dir, target, seen):
            pids.append(int(pid_dir.name))
    return sorted(pids)


def refuse_if_open(name: str) -> Binding:
    """Busy if `name`'s vhost-vdpa node is open: unbinding or deleting it would wait,
    uninterruptibly, for the last close. Returns the current binding."""
    current = binding_of(name)
    if current.node is not None and (pids := holders(current.node)):
        raise Busy(errno.EBUSY, f"{name}: {current.node} is open by pid {', '.join(map(str, pids))}; "
                                "close it first (the kernel would wait for it)")
    return current


def unbind(name: str) -> None:
    """Unbind `name` from its driver and clear its driver_override.

    Refuses (Busy) while its vhost-vdpa node is open: the kernel's unbind
    would wait, uninterruptibly, for the last close.
    """
    device_dir = _device_dir(name)
    current = refuse_if_open(name)
    if current.driver is None:
        return
    _write(device_dir / "driver" / "unbind", name, f"unbinding {name} from {current.driver}")
    _write(device_dir / "driver_override", "\n", f"clearing driver_override of {name}")
