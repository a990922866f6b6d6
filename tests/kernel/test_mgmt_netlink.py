"""The vdpa netlink family against vdpa_sim: every command, its replies decoded, its refusals named."""

from __future__ import annotations

import struct
import subprocess
import threading
from pathlib import Path

import pytest
import trio

from vdpad.device import DeviceStatus, InvalidArgument, VhostVdpa
from vdpad.mgmt import (
    AlreadyExists, MgmtError, ModuleMissing, NotFound, NotSupported, VdpaNetlink, aio, attach, detach,
)
from vdpad.device.flags import VirtioDeviceId

pytestmark = pytest.mark.kernel

VDPA_BUS = Path("/sys/bus/vdpa")
# vdpa_sim_net offers (drivers/vdpa/vdpa_sim): ANY_LAYOUT, VERSION_1, ACCESS_PLATFORM, MAC, STATUS, MTU,
# CTRL_VQ, CTRL_MAC_ADDR.
SIM_NET_FEATURES = (1 << 27) | (1 << 32) | (1 << 33) | (1 << 5) | (1 << 16) | (1 << 3) | (1 << 17) | (1 << 23)
VERSION_1, ACCESS_PLATFORM, F_MAC = 1 << 32, 1 << 33, 1 << 5


@pytest.fixture
def made(nl):
    """Names to delete after the test, whatever happened."""
    names: list[str] = []
    yield names
    present = {d.name for d in nl.devices()}
    for name in names:
        if name in present:
            detach(nl, name)


def negotiate(fd: VhostVdpa, features: int) -> None:
    """Drive the device to FEATURES_OK as a virtio driver would (what DEV_VSTATS_GET waits for)."""
    fd.set_owner()
    fd.set_features(features)
    fd.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK)


def test_mgmtdev_dump_and_single_agree_with_sysfs(nl):
    dumped = {m.handle: m for m in nl.mgmtdevs()}
    assert {"vdpasim_net", "vdpasim_blk"} <= set(dumped)
    net, blk = dumped["vdpasim_net"], dumped["vdpasim_blk"]
    assert (net.bus, net.classes, net.max_vqs, net.supported_features) == (None, (VirtioDeviceId.NET,), 3, SIM_NET_FEATURES)
    assert (blk.classes, blk.max_vqs, blk.supported_features) == ((VirtioDeviceId.BLOCK,), 0, 0)
    for handle, record in dumped.items():
        assert nl.mgmtdev(handle) == record


def test_unknown_mgmtdev_is_not_found(nl):
    with pytest.raises(NotFound, match="nope"):
        nl.mgmtdev("nope")


def test_new_get_del_round_trip(nl, made):
    before = {d.name for d in nl.devices()}
    nl.new_device("nl-net0", "vdpasim_net", mac="02:00:00:00:10:01", mtu=4000)
    made.append("nl-net0")
    nl.new_device("nl-blk0", "vdpasim_blk")
    made.append("nl-blk0")
    devices = {d.name: d for d in nl.devices()}
    assert set(devices) - before == {"nl-net0", "nl-blk0"}
    net, blk = devices["nl-net0"], devices["nl-blk0"]
    assert (net.mgmtdev, net.device_id, net.max_vqs, net.max_vq_size, net.min_vq_size) == ("vdpasim_net", 1, 3, 256, 1)
    assert (blk.mgmtdev, blk.device_id, blk.max_vqs, blk.max_vq_size) == ("vdpasim_blk", 2, 1, 256)
    assert nl.device("nl-net0") == net and nl.device("nl-blk0") == blk
    assert (VDPA_BUS / "devices" / "nl-net0").is_dir()

    nl.delete_device("nl-net0")
    assert not (VDPA_BUS / "devices" / "nl-net0").exists()
    with pytest.raises(NotFound, match="nl-net0"):
        nl.device("nl-net0")
    with pytest.raises(NotFound):
        nl.delete_device("nl-net0")


def test_net_config_carries_what_dev_new_asked(nl, made):
    nl.new_device("nl-net1", "vdpasim_net", mac="02:AB:00:00:10:02", mtu=9000)
    made.append("nl-net1")
    config = nl.config("nl-net1")
    assert (config.device_id, config.features, config.negotiated_features) == (VirtioDeviceId.NET, SIM_NET_FEATURES, None)
    assert config.net.mac == "02:ab:00:00:10:02"
    assert config.net.mtu == 9000
    assert config.net.link_up is True  # vdpa_sim sets VIRTIO_NET_S_LINK_UP
    assert config.net.max_vq_pairs is None  # no MQ offered: the kernel leaves it out
    assert config.blk is None
    assert config in nl.configs()


def test_provisioned_features_are_what_the_device_offers(nl, made):
    offered = VERSION_1 | ACCESS_PLATFORM | F_MAC
    nl.new_device("nl-net2", "vdpasim_net", mac="02:00:00:00:10:03", features=offered)
    made.append("nl-net2")
    assert nl.config("nl-net2").features == offered


def test_blk_config_matches_the_vhost_fd(sim_device, nl):
    """DEV_CONFIG_GET decoded against the config space read through VHOST_VDPA_GET_CONFIG."""
    dev = sim_device("vdpasim_blk")
    config = nl.config(dev.name)
    with VhostVdpa(dev.node) as fd:
        space = fd.get_config(0, 60)
    # struct virtio_blk_config (virtio spec 5.2.4), little-endian for a VERSION_1 device
    capacity, size_max, seg_max = struct.unpack_from("<QII", space, 0)
    blk_size, phys_exp, align, min_io, opt_io = struct.unpack_from("<IBBHI", space, 20)
    num_queues, max_disc, max_disc_seg, disc_align, max_wz, max_wz_seg = struct.unpack_from("<HIIIII", space, 34)
    blk = config.blk
    assert config.device_id == VirtioDeviceId.BLOCK and config.net is None
    assert (blk.capacity, blk.size_max, blk.seg_max, blk.blk_size) == (capacity, size_max, seg_max, blk_size)
    assert (blk.physical_block_exp, blk.alignment_offset, blk.min_io_size, blk.opt_io_size) == (
        phys_exp, align, min_io, opt_io)
    assert blk.num_queues == num_queues
    assert (blk.max_discard_sectors, blk.max_discard_seg, blk.discard_sector_alignment) == (
        max_disc, max_disc_seg, disc_align)
    assert (blk.max_write_zeroes_sectors, blk.max_write_zeroes_seg) == (max_wz, max_wz_seg)
    features = config.features
    assert blk.read_only == bool(features >> 5 & 1) and blk.flush == bool(features >> 9 & 1)
    assert blk.capacity == 0x40000  # vdpa_sim_blk: 128 MiB of RAM disk


def test_net_config_matches_the_vhost_fd(sim_device, nl):
    dev = sim_device("vdpasim_net")
    nl.set_mac(dev.name, "02:00:00:00:10:04")
    config = nl.config(dev.name)
    with VhostVdpa(dev.node) as fd:
        space = fd.get_config(0, 12)
    mac, status, _pairs, mtu = space[:6], *struct.unpack_from("<HHH", space, 6)
    assert config.net.mac == mac.hex(":") == "02:00:00:00:10:04"
    assert (config.net.status, config.net.mtu) == (status, mtu)


def test_vstats_need_negotiated_features_and_then_count(sim_device, nl):
    dev = sim_device("vdpasim_net")
    with pytest.raises(MgmtError, match="feature negotiation not complete") as refused:
        nl.vstats(dev.name, 0)
    assert refused.value.errno == 11  # EAGAIN, with the kernel's own words
    with VhostVdpa(dev.node) as fd:
        negotiate(fd, SIM_NET_FEATURES)
        rx, tx, cvq = (nl.vstats(dev.name, q) for q in range(3))
        assert nl.config(dev.name).negotiated_features == SIM_NET_FEATURES
    assert [name for name, _ in rx.counters] == ["rx packets", "rx bytes", "rx errors", "rx overruns", "rx drops"]
    assert [name for name, _ in tx.counters] == ["tx packets", "tx bytes", "tx errors", "tx drops"]
    assert [name for name, _ in cvq.counters] == ["cvq requests", "cvq successes", "cvq errors"]
    assert all(value == 0 for s in (rx, tx, cvq) for _, value in s.counters)  # nothing was sent yet
    assert (rx.queue_index, tx.queue_index, cvq.queue_index) == (0, 1, 2)
    assert (rx.queue_type, tx.queue_type, cvq.queue_type) == ("rx", "tx", "cvq")
    assert rx.negotiated_features == SIM_NET_FEATURES


def test_vstats_of_a_blk_device_are_not_supported(sim_device, nl):
    dev = sim_device("vdpasim_blk")
    with pytest.raises(NotSupported, match="DEV_VSTATS_GET"):
        nl.vstats(dev.name, 0)


def test_attr_set_changes_the_mac(sim_device, nl):
    dev = sim_device("vdpasim_net")
    nl.set_mac(dev.name, "02:00:00:00:10:05")
    assert nl.config(dev.name).net.mac == "02:00:00:00:10:05"


def test_attr_set_on_a_blk_device_is_refused_before_sending(sim_device, nl):
    dev = sim_device("vdpasim_blk")
    with pytest.raises(InvalidArgument, match="block"):
        nl.set_mac(dev.name, "02:00:00:00:10:06")


@pytest.mark.parametrize("kwargs, error, text", [
    ({"mgmtdev": "nope"}, NotFound, "Fail to find the specified management device"),
    ({"mgmtdev": "vdpasim_net", "max_vqp": 2}, NotSupported, "not supported"),  # vdpa_sim_net has no MQ
    ({"mgmtdev": "vdpasim_blk", "mtu": 1500}, NotSupported, "not supported"),
    ({"mgmtdev": "vdpasim_net", "mac": "02:00:00:00:10:07", "features": VERSION_1}, MgmtError,
     "Missing features 0x20"),
])
def test_dev_new_refusals_carry_the_kernels_words_and_make_nothing(nl, kwargs, error, text):
    before = nl.devices()
    with pytest.raises(error, match=text):
        nl.new_device("nl-bad", **kwargs)
    assert nl.devices() == before


def test_duplicate_name(nl, made):
    nl.new_device("nl-dup", "vdpasim_net")
    made.append("nl-dup")
    with pytest.raises(AlreadyExists, match="nl-dup"):
        nl.new_device("nl-dup", "vdpasim_blk")
    assert nl.device("nl-dup").mgmtdev == "vdpasim_net"


def test_trio_calls_run_off_the_loop(sim_modules):
    """The netlink and sysfs work of an attach happens in a worker thread while the loop keeps ticking."""
    loop_thread = threading.get_ident()
    seen: dict[str, object] = {}

    def attach_and_note(nl, *args, **kwargs):
        seen["thread"] = threading.get_ident()
        return attach(nl, *args, **kwargs)

    async def main():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await trio.sleep(0)
                ticks += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            attached = await aio.run(attach_and_note, "nl-trio", "vdpasim_net")
            seen["ticks_during_attach"] = ticks
            seen["listed"] = [d.name for d in await aio.run(VdpaNetlink.devices)]
            await aio.run(detach, "nl-trio")
            seen["after"] = [d.name for d in await aio.run(VdpaNetlink.devices)]
            nursery.cancel_scope.cancel()
        return attached

    attached = trio.run(main)
    assert seen["thread"] != loop_thread
    assert seen["ticks_during_attach"] > 0
    assert attached.binding.node is not None and "nl-trio" in seen["listed"]
    assert "nl-trio" not in seen["after"]


def test_trio_errors_come_back_typed(sim_modules):
    async def main():
        await aio.run(VdpaNetlink.device, "nl-missing")

    with pytest.raises(NotFound, match="nl-missing"):
        trio.run(main)


def test_a_missing_family_names_the_module(sim_modules):
    """With the vdpa module unloaded, opening the family says which module to load."""
    stack = ("vhost_vdpa", "virtio_vdpa", "vdpa_sim_net", "vdpa_sim_blk", "vdpa_sim", "vdpa")
    with VdpaNetlink() as nl:
        assert nl.devices() == [], "needs a bus without devices to unload the modules"
    subprocess.run(["modprobe", "-r", *stack], check=True, capture_output=True)
    try:
        with pytest.raises(ModuleMissing, match="modprobe vdpa") as missing:
            VdpaNetlink()
        assert missing.value.module == "vdpa"
    finally:
        subprocess.run(["modprobe", "-a", "vhost_vdpa", "vdpa_sim_net", "vdpa_sim_blk"], check=True)
