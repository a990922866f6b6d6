"""Each fd kind offers what its kernel driver serves, and nothing it refuses."""

from __future__ import annotations

from vdpad.device import VhostNet, VhostVdpa

# docs/kernel-notes.md: vhost-vdpa answers the log and endian ioctls with ENOTTY and keeps the
# busyloop timeout without using it (test_device_vdpa.py pins each through the raw ioctl).
VHOST_CORE_ONLY = ["get_vring_busyloop_timeout", "get_vring_endian", "set_log_base", "set_log_fd",
                   "set_vring_busyloop_timeout", "set_vring_endian"]


def test_vhost_vdpa_offers_no_vhost_core_only_call():
    assert [name for name in VHOST_CORE_ONLY if hasattr(VhostVdpa, name)] == []


def test_vhost_net_keeps_them():
    assert [name for name in VHOST_CORE_ONLY if not callable(getattr(VhostNet, name, None))] == []
