"""Named flags: backend features are masks of the uapi's bit numbers; status and feature bits per the virtio spec."""

from __future__ import annotations

import enum

import pytest

from vdpad.device.flags import (
    BackendFeature, BlkFeature, DeviceStatus, NetFeature, VirtioDeviceId, VirtioFeature, describe,
)


def test_backend_features_are_masks():
    # kernel-facts.md: vdpa_sim offers 0x17e; vhost-net 0x2.
    assert describe(0x17E, BackendFeature) == [
        "IOTLB_MSG_V2", "IOTLB_BATCH", "IOTLB_ASID", "SUSPEND", "RESUME", "ENABLE_AFTER_DRIVER_OK", "IOTLB_PERSIST"]
    assert BackendFeature(0x2) is BackendFeature.IOTLB_MSG_V2
    assert BackendFeature.DESC_ASID == 1 << 7


def test_device_status_bits():
    assert [int(s) for s in (DeviceStatus.ACKNOWLEDGE, DeviceStatus.DRIVER, DeviceStatus.DRIVER_OK,
                             DeviceStatus.FEATURES_OK, DeviceStatus.NEEDS_RESET, DeviceStatus.FAILED)] == [
        1, 2, 4, 8, 0x40, 0x80]
    assert describe(0x0F, DeviceStatus) == ["ACKNOWLEDGE", "DRIVER", "DRIVER_OK", "FEATURES_OK"]


def test_feature_bits_where_the_spec_puts_them():
    assert (VirtioFeature.VERSION_1, VirtioFeature.ACCESS_PLATFORM, VirtioFeature.RING_PACKED) == (
        1 << 32, 1 << 33, 1 << 34)
    assert (NetFeature.MAC, NetFeature.STATUS, NetFeature.CTRL_VQ, NetFeature.MQ, NetFeature.MTU) == (
        1 << 5, 1 << 16, 1 << 17, 1 << 22, 1 << 3)
    assert (BlkFeature.BLK_SIZE, BlkFeature.FLUSH) == (1 << 6, 1 << 9)


def test_describe_names_by_the_first_kind_and_shows_unknown_bits():
    # vhost-net's offer on 6.12, decoded: bit 27 is VHOST_NET_F_VIRTIO_NET_HDR there.
    assert describe(0x1033D008000, NetFeature, VirtioFeature) == [
        "MRG_RXBUF", "NOTIFY_ON_EMPTY", "LOG_ALL", "VHOST_NET_HDR", "INDIRECT_DESC", "EVENT_IDX",
        "VERSION_1", "ACCESS_PLATFORM", "RING_RESET"]
    assert describe(1 << 49 | 1, BlkFeature) == ["bit0", "bit49"]


@pytest.mark.parametrize("kind", [BackendFeature, DeviceStatus, VirtioFeature, NetFeature, BlkFeature])
def test_one_name_per_bit(kind: type[enum.IntFlag]):
    values = [member.value for member in kind.__members__.values()]
    assert len(values) == len(set(values)), f"{kind.__name__} names a bit twice"
    assert all(v & (v - 1) == 0 for v in values), f"{kind.__name__} has a member that is not one bit"


def test_device_ids_and_their_class_names():
    # kernel-facts.md: vdpa_sim's net is device 1, its blk device 2 (GET_DEVICE_ID and DEV_GET agree).
    assert (VirtioDeviceId.NET, VirtioDeviceId.BLOCK) == (1, 2)
    assert [VirtioDeviceId(i).class_name for i in (1, 2, 9, 26)] == ["net", "block", "9p", "fs"]
