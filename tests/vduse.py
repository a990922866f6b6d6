"""The VDUSE rig of the kernel tests, inside the VM: a virtio-blk device served by qemu-storage-daemon.

vduse.ko lets a userspace process serve a vDPA device; qemu-storage-daemon's
`--export type=vduse-blk` serves one from a plain file through QEMU's block
layer. The VDUSE device appears first (/sys/class/vduse/NAME); a vdpa device
of the same name is then made on mgmtdev `vduse` and bound to vhost_vdpa.

Order matters on the way out: qemu-storage-daemon cannot destroy a VDUSE
device that the vdpa bus still has, so the vdpa device is detached first.
"""

from __future__ import annotations

import gc
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vdpad.mgmt import Busy, Driver, NotFound, VdpaNetlink, attach, detach

QSD = "qemu-storage-daemon"
VDUSE_CLASS = Path("/sys/class/vduse")
MGMTDEV = "vduse"
MODULES = ("vduse", "vhost_vdpa")
APPEAR_TIMEOUT = 30.0  # qsd starts in about 1.5 s under TCG
EXIT_TIMEOUT = 10.0


class QsdError(RuntimeError):
    """qemu-storage-daemon did not serve the device; carries what it printed."""


@dataclass(frozen=True)
class VduseExport:
    """A VDUSE virtio-blk device served by qemu-storage-daemon from `image`."""

    name: str
    image: Path
    size: int
    qsd: subprocess.Popen


@dataclass(frozen=True)
class VduseBlk:
    """A VduseExport attached to vhost_vdpa: its /dev/vhost-vdpa-N node."""

    export: VduseExport
    node: Path

    @property
    def name(self) -> str:
        return self.export.name

    @property
    def image(self) -> Path:
        return self.export.image


def load_vduse() -> None:
    proc = subprocess.run(["modprobe", "-a", *MODULES], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"modprobe -a {' '.join(MODULES)} exited {proc.returncode}: {proc.stderr.strip()}")


def _qsd_argv(name: str, image: Path) -> list[str]:
    return [QSD,
            "--blockdev", f"driver=file,node-name=f0,filename={image}",
            "--blockdev", "driver=raw,node-name=d0,file=f0",
            "--export", f"type=vduse-blk,id=v0,name={name},node-name=d0,writable=on"]


def _output(qsd: subprocess.Popen) -> str:
    """What qsd printed (it has exited, or has just been stopped)."""
    out, _ = qsd.communicate(timeout=EXIT_TIMEOUT)
    return out.decode(errors="replace").strip()


@contextmanager
def vduse_export(name: str, size: int = 16 << 20) -> Iterator[VduseExport]:
    """qemu-storage-daemon serving a zeroed `size`-byte file as VDUSE device `name`; no vdpa device yet.

    On exit a vdpa device of that name (made by the test, or by vduse_blk) is
    detached, then qsd is stopped and the file removed.
    """
    if shutil.which(QSD) is None:
        raise RuntimeError(f"{QSD} is missing: install Debian's qemu-system-common")
    folder = Path(tempfile.mkdtemp(prefix=f"vduse-{name}-"))
    image = folder / "disk.img"
    with open(image, "wb") as disk:
        disk.truncate(size)
    # Pipes, not our files: QEMU opens what it is given with O_TRUNC.
    qsd = subprocess.Popen(_qsd_argv(name, image), stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + APPEAR_TIMEOUT
        while not (VDUSE_CLASS / name).exists():
            if qsd.poll() is not None:
                raise QsdError(f"{QSD} exited {qsd.returncode} before VDUSE device {name} appeared: {_output(qsd)}")
            if time.monotonic() > deadline:
                raise QsdError(f"VDUSE device {name} did not appear within {APPEAR_TIMEOUT:g} s")
            time.sleep(0.02)
        yield VduseExport(name, image, size, qsd)
    finally:
        try:
            _detach_if_present(name)
        finally:
            try:
                _stop(qsd, name)
            finally:
                shutil.rmtree(folder)


def _detach_if_present(name: str) -> None:
    with VdpaNetlink() as nl:
        try:
            detach(nl, name)
        except NotFound:
            pass  # never attached, or the test detached it
        except Busy:
            gc.collect()  # a failed test's traceback may still hold an open VhostVdpa
            detach(nl, name)


def _stop(qsd: subprocess.Popen, name: str) -> None:
    if qsd.poll() is None:
        qsd.terminate()
        try:
            qsd.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            qsd.kill()
            raise QsdError(f"{QSD} serving {name} did not stop within {EXIT_TIMEOUT:g} s of SIGTERM: "
                           f"killed; {_output(qsd)}") from None
    output = _output(qsd)
    if qsd.returncode != 0:
        raise QsdError(f"{QSD} serving {name} exited {qsd.returncode}: {output}")


@contextmanager
def vduse_blk(name: str, size: int = 16 << 20) -> Iterator[VduseBlk]:
    """A VDUSE blk device served from a `size`-byte file, attached to vhost_vdpa by vdpad.mgmt."""
    with vduse_export(name, size) as export, VdpaNetlink() as nl:
        node = attach(nl, name, MGMTDEV, driver=Driver.VHOST_VDPA).binding.node
        yield VduseBlk(export, node)
