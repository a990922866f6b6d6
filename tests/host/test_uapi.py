"""The compiled uapi against the values in shared/docs/kernel-facts.md (6.12)."""

import pytest

from vdpad._uapi import ffi, lib


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | 0xAF << 8 | nr


NONE, WRITE, READ = 0, 1, 2

IOCTLS = {
    "VHOST_GET_FEATURES": _ioc(READ, 0x00, 8),
    "VHOST_SET_FEATURES": _ioc(WRITE, 0x00, 8),
    "VHOST_SET_OWNER": _ioc(NONE, 0x01, 0),
    "VHOST_RESET_OWNER": _ioc(NONE, 0x02, 0),
    "VHOST_SET_MEM_TABLE": _ioc(WRITE, 0x03, 8),
    "VHOST_SET_LOG_BASE": _ioc(WRITE, 0x04, 8),
    "VHOST_SET_LOG_FD": _ioc(WRITE, 0x07, 4),
    "VHOST_SET_VRING_NUM": _ioc(WRITE, 0x10, 8),
    "VHOST_SET_VRING_ADDR": _ioc(WRITE, 0x11, 40),
    "VHOST_SET_VRING_BASE": _ioc(WRITE, 0x12, 8),
    "VHOST_GET_VRING_BASE": _ioc(READ | WRITE, 0x12, 8),
    "VHOST_SET_VRING_ENDIAN": _ioc(WRITE, 0x13, 8),
    "VHOST_GET_VRING_ENDIAN": _ioc(WRITE, 0x14, 8),
    "VHOST_SET_VRING_KICK": _ioc(WRITE, 0x20, 8),
    "VHOST_SET_VRING_CALL": _ioc(WRITE, 0x21, 8),
    "VHOST_SET_VRING_ERR": _ioc(WRITE, 0x22, 8),
    "VHOST_SET_VRING_BUSYLOOP_TIMEOUT": _ioc(WRITE, 0x23, 8),
    "VHOST_GET_VRING_BUSYLOOP_TIMEOUT": _ioc(WRITE, 0x24, 8),  # _IOW in the uapi, though it reads back
    "VHOST_SET_BACKEND_FEATURES": _ioc(WRITE, 0x25, 8),
    "VHOST_GET_BACKEND_FEATURES": _ioc(READ, 0x26, 8),
    "VHOST_NET_SET_BACKEND": _ioc(WRITE, 0x30, 8),
    "VHOST_VDPA_GET_DEVICE_ID": _ioc(READ, 0x70, 4),
    "VHOST_VDPA_GET_STATUS": _ioc(READ, 0x71, 1),
    "VHOST_VDPA_SET_STATUS": _ioc(WRITE, 0x72, 1),
    "VHOST_VDPA_GET_CONFIG": _ioc(READ, 0x73, 8),
    "VHOST_VDPA_SET_CONFIG": _ioc(WRITE, 0x74, 8),
    "VHOST_VDPA_SET_VRING_ENABLE": _ioc(WRITE, 0x75, 8),
    "VHOST_VDPA_GET_VRING_NUM": _ioc(READ, 0x76, 2),
    "VHOST_VDPA_SET_CONFIG_CALL": _ioc(WRITE, 0x77, 4),
    "VHOST_VDPA_GET_IOVA_RANGE": _ioc(READ, 0x78, 16),
    "VHOST_VDPA_GET_CONFIG_SIZE": _ioc(READ, 0x79, 4),
    "VHOST_VDPA_GET_AS_NUM": _ioc(READ, 0x7A, 4),
    "VHOST_VDPA_GET_VRING_GROUP": _ioc(READ | WRITE, 0x7B, 8),
    "VHOST_VDPA_SET_GROUP_ASID": _ioc(WRITE, 0x7C, 8),
    "VHOST_VDPA_SUSPEND": _ioc(NONE, 0x7D, 0),
    "VHOST_VDPA_RESUME": _ioc(NONE, 0x7E, 0),
    "VHOST_VDPA_GET_VRING_DESC_GROUP": _ioc(READ | WRITE, 0x7F, 8),
    "VHOST_VDPA_GET_VQS_COUNT": _ioc(READ, 0x80, 4),
    "VHOST_VDPA_GET_GROUP_NUM": _ioc(READ, 0x81, 4),
    "VHOST_VDPA_GET_VRING_SIZE": _ioc(READ | WRITE, 0x82, 8),
}


@pytest.mark.parametrize("name, number", sorted(IOCTLS.items()))
def test_ioctl_number(name, number):
    assert getattr(lib, name) == number


def test_known_request_values():
    # Spot checks quoted verbatim from the probe run on 6.12.
    assert lib.VHOST_GET_BACKEND_FEATURES == 0x8008AF26
    assert lib.VHOST_VDPA_GET_DEVICE_ID == 0x8004AF70


@pytest.mark.parametrize("struct, size", [
    ("struct vhost_vring_state", 8),
    ("struct vhost_vring_file", 8),
    ("struct vhost_vring_addr", 40),
    ("struct vhost_iotlb_msg", 32),
    ("struct vhost_msg", 72),  # int + 4 bytes padding: the union holds u64s
    ("struct vhost_msg_v2", 72),
    ("struct vhost_memory_region", 32),
    ("struct vhost_memory", 8),
    ("struct vhost_vdpa_config", 8),
    ("struct vhost_vdpa_iova_range", 16),
])
def test_struct_size(struct, size):
    assert ffi.sizeof(struct) == size


@pytest.mark.parametrize("struct, field, offset", [
    ("struct vhost_msg_v2", "type", 0),
    ("struct vhost_msg_v2", "asid", 4),
    ("struct vhost_msg_v2", "iotlb", 8),
    ("struct vhost_msg", "iotlb", 8),
    ("struct vhost_iotlb_msg", "iova", 0),
    ("struct vhost_iotlb_msg", "size", 8),
    ("struct vhost_iotlb_msg", "uaddr", 16),
    ("struct vhost_iotlb_msg", "perm", 24),
    ("struct vhost_iotlb_msg", "type", 25),
    ("struct vhost_vring_addr", "desc_user_addr", 8),
    ("struct vhost_vring_addr", "log_guest_addr", 32),
    ("struct vhost_memory", "regions", 8),
    ("struct vhost_vdpa_config", "buf", 8),
    ("struct vhost_vdpa_config", "len", 4),
    ("struct vhost_vring_state", "num", 4),
    ("struct vhost_vring_file", "fd", 4),
    ("struct vhost_vring_addr", "flags", 4),
    ("struct vhost_vring_addr", "used_user_addr", 16),
    ("struct vhost_vring_addr", "avail_user_addr", 24),
    ("struct vhost_memory_region", "memory_size", 8),
    ("struct vhost_memory_region", "userspace_addr", 16),
    ("struct vhost_memory_region", "flags_padding", 24),
    ("struct vhost_vdpa_iova_range", "last", 8),
])
def test_field_offset(struct, field, offset):
    assert ffi.offsetof(struct, field) == offset


def test_constants():
    assert (lib.VHOST_IOTLB_MSG, lib.VHOST_IOTLB_MSG_V2) == (1, 2)
    assert (lib.VHOST_ACCESS_RO, lib.VHOST_ACCESS_WO, lib.VHOST_ACCESS_RW) == (1, 2, 3)
    assert [lib.VHOST_IOTLB_MISS, lib.VHOST_IOTLB_UPDATE, lib.VHOST_IOTLB_INVALIDATE,
            lib.VHOST_IOTLB_ACCESS_FAIL, lib.VHOST_IOTLB_BATCH_BEGIN,
            lib.VHOST_IOTLB_BATCH_END] == [1, 2, 3, 4, 5, 6]
    # Bit numbers, not masks.
    assert [lib.VHOST_BACKEND_F_IOTLB_MSG_V2, lib.VHOST_BACKEND_F_IOTLB_BATCH,
            lib.VHOST_BACKEND_F_IOTLB_ASID, lib.VHOST_BACKEND_F_SUSPEND,
            lib.VHOST_BACKEND_F_RESUME, lib.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK,
            lib.VHOST_BACKEND_F_DESC_ASID, lib.VHOST_BACKEND_F_IOTLB_PERSIST] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_vhost_core_constants():
    assert lib.VHOST_VIRTIO == 0xAF
    assert lib.VHOST_FILE_UNBIND == -1
    assert lib.VHOST_PAGE_SIZE == 0x1000
    assert (lib.VHOST_VRING_LITTLE_ENDIAN, lib.VHOST_VRING_BIG_ENDIAN) == (0, 1)
    assert lib.VHOST_VRING_F_LOG == 0
    assert (lib.VHOST_F_LOG_ALL, lib.VHOST_NET_F_VIRTIO_NET_HDR) == (26, 27)
