"""Driver binding through sysfs against vdpa_sim: vhost_vdpa nodes, virtio_vdpa netdevs and disks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vdpad.mgmt import Busy, Driver, NotFound, VdpaNetlink, bind, binding_of, unbind
from vdpad.mgmt.binding import holders

pytestmark = pytest.mark.kernel

VDPA_BUS = Path("/sys/bus/vdpa")


@pytest.fixture
def virtio_vdpa(sim_modules) -> None:
    subprocess.run(["modprobe", "virtio_vdpa"], check=True)


@pytest.fixture
def fresh(sim_modules):
    """A factory of devices made with DEV_NEW only (bound to whatever probed first), deleted after."""
    names: list[str] = []
    with VdpaNetlink() as nl:
        def make(name: str, mgmtdev: str) -> str:
            nl.new_device(name, mgmtdev)
            names.append(name)
            return name

        yield make
        for name in names:
            unbind(name)
            nl.delete_device(name)


def test_bind_to_vhost_vdpa_gives_the_char_device_sysfs_names(fresh):
    name = fresh("bd-net0", "vdpasim_net")
    bound = bind(name, Driver.VHOST_VDPA)
    child = next((VDPA_BUS / "devices" / name).glob("vhost-vdpa-*"))
    major, minor = map(int, (child / "dev").read_text().split(":"))
    st = os.stat(bound.node)
    assert bound.node == Path("/dev") / child.name
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (major, minor)
    assert binding_of(name) == bound
    assert (VDPA_BUS / "devices" / name / "driver_override").read_text().strip() == "vhost_vdpa"


def test_virtio_vdpa_makes_a_netdev_and_back(fresh, virtio_vdpa):
    name = fresh("bd-net1", "vdpasim_net")
    bound = bind(name, Driver.VIRTIO_VDPA)
    assert bound.driver == "virtio_vdpa" and bound.node is None
    (ifname,) = bound.kernel_devices
    assert Path("/sys/class/net", ifname).exists()
    mac = Path("/sys/class/net", ifname, "address").read_text().strip()
    with VdpaNetlink() as nl:
        assert nl.config(name).net.mac == mac  # the netdev took the device's config-space MAC
        assert nl.config(name).negotiated_features is not None  # virtio_net negotiated

    back = bind(name, Driver.VHOST_VDPA)
    assert back.node is not None and back.node.exists()
    assert not Path("/sys/class/net", ifname).exists()


def test_virtio_vdpa_makes_a_disk(fresh, virtio_vdpa):
    name = fresh("bd-blk0", "vdpasim_blk")
    bound = bind(name, Driver.VIRTIO_VDPA)
    (disk,) = bound.kernel_devices
    sectors = int(Path("/sys/block", disk, "size").read_text())
    with VdpaNetlink() as nl:
        assert nl.config(name).blk.capacity == sectors


def test_unbind_is_refused_while_the_node_is_open(fresh):
    name = fresh("bd-net2", "vdpasim_net")
    node = bind(name, Driver.VHOST_VDPA).node
    fd = os.open(node, os.O_RDWR)
    try:
        assert os.getpid() in holders(node)
        with pytest.raises(Busy, match=str(os.getpid())):
            unbind(name)
        assert binding_of(name).driver == "vhost_vdpa"
    finally:
        os.close(fd)
    assert holders(node) == []
    unbind(name)
    assert binding_of(name).driver is None
    assert not node.exists()


def test_unknown_device_is_not_found(sim_modules):
    with pytest.raises(NotFound, match="bd-none"):
        bind("bd-none", Driver.VHOST_VDPA)


def test_a_failed_attach_whose_node_someone_opened_leaves_the_device_instead_of_hanging(sim_modules, monkeypatch):
    """The undo must not DEV_DEL a device whose node is open: the kernel would wait uninterruptibly."""
    from vdpad.device import VhostVdpa
    from vdpad.mgmt import attach, detach, lifecycle

    held = []
    real_bind = lifecycle.binding.bind

    def bind_then_lose_the_race(name, driver, timeout):
        # Another process opens the fresh node before attach is done, then attach fails.
        held.append(VhostVdpa(real_bind(name, Driver.VHOST_VDPA, timeout).node))
        raise TimeoutError("the driver's node did not appear")

    monkeypatch.setattr(lifecycle.binding, "bind", bind_then_lose_the_race)
    with VdpaNetlink() as nl:
        with pytest.raises(TimeoutError) as failed:
            attach(nl, "race0", "vdpasim_net", driver=Driver.VHOST_VDPA)
        note = " ".join(failed.value.__notes__)
        assert "deleting race0 again failed too" in note and "is open by pid" in note
        assert nl.device("race0").name == "race0"  # left in place, not hung in DEV_DEL
        held.pop().close()
        detach(nl, "race0")
        with pytest.raises(NotFound):
            nl.device("race0")
