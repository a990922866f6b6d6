"""`vdpad info` on vdpa_sim: what the device does not support shows as `-` (null), and a node another
holder has open falls back to what netlink knows. (VDUSE: test_vduse_blk.py.)"""

from __future__ import annotations

import json
import os

import pytest
from structlog.testing import capture_logs

from tests.cli import vdpad
from tests.sim import debug_logging
from vdpad.device import DeviceStatus, VhostVdpa, VirtioFeature

pytestmark = pytest.mark.kernel


def test_unsupported_queries_show_as_null_and_the_rest_is_shown(vdpa_net):
    """vdpa_sim's default batch_mapping=1 has no GET_VRING_SIZE (kernel-notes.md): null, not exit 1."""
    with debug_logging(), capture_logs() as events:
        code, out, err = vdpad("info", str(vdpa_net.node), "--json")
    assert (code, err) == (0, "")
    info = json.loads(out)
    assert info["vring_sizes"] is None
    assert (info["device"], info["source"], info["held_by"]) == (vdpa_net.name, "fd", None)
    assert (info["device_id"], info["vqs"], info["vq_groups"], info["groups"], info["address_spaces"]) == (
        1, 3, [0, 0, 1], 2, 2)
    assert "IOTLB_PERSIST" in info["backend_feature_names"]
    assert info["negotiated_features"] is None  # netlink's to tell, not the fd's
    assert [e["path"] for e in events if e["event"] == "info.path"] == ["fd"]
    assert [e["query"] for e in events if e["event"] == "info.unsupported"] == ["GET_VRING_SIZE"]

    code, out, err = vdpad("info", str(vdpa_net.node))
    assert (code, err) == (0, "")
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["vring_sizes"] == "-" and lines["vq_groups"] == "0 0 1" and lines["class"] == "net"


def test_a_node_held_open_falls_back_to_netlink(vdpa_net):
    """vhost-vdpa allows one open: the CLI in this process gets EBUSY, and shows netlink's view instead."""
    negotiated = VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM
    with VhostVdpa(vdpa_net.node) as held:
        held.set_owner()
        held.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        held.set_features(negotiated)
        held.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK)
        with debug_logging(), capture_logs() as events:
            code, out, err = vdpad("info", str(vdpa_net.node), "--json")
        table_code, table, table_err = vdpad("info", str(vdpa_net.node))
        detach_code, _, detach_err = vdpad("detach", vdpa_net.name)
    assert code == 0
    assert err == (f"vdpad: {vdpa_net.node} is open by pid {os.getpid()} (this process); showing what netlink "
                   f"knows of vdpa device {vdpa_net.name} (- marks what only the node's fd can tell)\n")
    info = json.loads(out)
    assert (info["source"], info["held_by"], info["device"]) == ("netlink", [os.getpid()], vdpa_net.name)
    assert (info["device_id"], info["class"], info["vqs"], info["vring_num_max"]) == (1, "net", 3, 256)
    assert info["negotiated_features"] == negotiated  # only netlink knows what the holder negotiated
    assert {"VERSION_1", "ACCESS_PLATFORM", "MAC"} <= set(info["feature_names"])
    for only_the_fd in ("backend_features", "vq_groups", "vring_sizes", "groups", "address_spaces",
                        "config_size", "iova_range"):
        assert info[only_the_fd] is None, only_the_fd
    path = next(e for e in events if e["event"] == "info.path")
    assert (path["path"], path["held_by"]) == ("netlink", [os.getpid()])

    assert (table_code, table_err) == (0, err)
    lines = dict(line.split(None, 1) for line in table.splitlines())
    assert lines["backend_features"] == "-" and lines["source"] == "netlink" and lines["vqs"] == "3"
    assert detach_code == 7 and f"pid {os.getpid()}" in detach_err  # detach still refuses an open node
