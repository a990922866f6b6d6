"""vdpad against iproute2's `vdpa -j` for the same devices: every field vdpad reports has a peer.

iproute2 (6.1 in Debian bookworm) decodes net config only, and does not show
device ids, min vq size, device features or bindings: those fields are
checked against the vhost-vdpa fd and sysfs instead.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from vdpad.cli import main
from vdpad.device import DeviceStatus, VhostVdpa

pytestmark = pytest.mark.kernel

IPROUTE_TYPES = {"net": "network", "block": "block"}


def vdpad_json(*args: str):
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def iproute(*args: str) -> dict:
    proc = subprocess.run(["vdpa", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def _stripped(record: dict) -> dict:
    return {key.strip(): value for key, value in record.items()}  # iproute2 6.1 writes "link " with a space


@pytest.fixture
def devices(sim_device):
    net = sim_device("vdpasim_net")
    blk = sim_device("vdpasim_blk")
    return net, blk


def test_mgmtdev_show(sim_modules):
    ours = {m["mgmtdev"]: m for m in vdpad_json("mgmtdev", "list")}
    theirs = iproute("mgmtdev", "show")["mgmtdev"]
    assert set(ours) == set(theirs)
    for handle, peer in theirs.items():
        mine = ours[handle]
        assert mine["classes"] == peer["supported_classes"]
        assert mine["max_vqs"] == peer["max_supported_vqs"]
        assert set(mine["supported_feature_names"]) == set(peer["dev_features"])
        assert bin(mine["supported_features"]).count("1") == len(peer["dev_features"])
        assert (mine["bus"], mine["name"]) == (None, handle)  # the simulators sit on no bus


def test_dev_show(devices):
    ours = {d["name"]: d for d in vdpad_json("dev", "list")}
    theirs = iproute("dev", "show")["dev"]
    assert set(ours) == set(theirs)
    for name, peer in theirs.items():
        mine = ours[name]
        assert IPROUTE_TYPES[mine["class"]] == peer["type"]
        assert (mine["mgmtdev"], mine["vendor_id"], mine["max_vqs"], mine["max_vq_size"]) == (
            peer["mgmtdev"], peer["vendor_id"], peer["max_vqs"], peer["max_vq_size"])
        assert mine["min_vq_size"] == peer.get("min_vq_size", 1)  # 6.1 leaves out the default of 1
        assert mine == vdpad_json("dev", "show", name)

    for dev in devices:
        mine = ours[dev.name]
        sysfs = Path("/sys/bus/vdpa/devices", dev.name)
        assert mine["driver"] == os.path.basename(os.readlink(sysfs / "driver"))
        assert mine["node"] == str(dev.node) and (sysfs / dev.node.name).is_dir()
        with VhostVdpa(dev.node) as fd:
            assert mine["device_id"] == fd.get_device_id()
            assert mine["max_vqs"] == fd.get_vqs_count()
            assert mine["max_vq_size"] == fd.get_vring_num()


def test_dev_config_show_before_and_after_negotiation(devices):
    net, blk = devices
    assert CliRunner().invoke(main, ["dev", "set", net.name, "--mac", "02:00:00:00:30:01"]).exit_code == 0
    with VhostVdpa(net.node) as fd:
        fd.set_owner()
        offered = fd.get_features()
        before = _compare_configs(net.name, blk.name, offered)
        assert before["negotiated_features"] is None
        fd.set_features(offered)
        fd.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK)
        after = _compare_configs(net.name, blk.name, offered)
        assert after["negotiated_features"] == offered


def _compare_configs(net_name: str, blk_name: str, offered: int) -> dict:
    ours = {c["name"]: c for c in vdpad_json("dev", "config")}
    theirs = iproute("dev", "config", "show")["config"]
    assert set(ours) == set(theirs)
    mine, peer = ours[net_name], _stripped(theirs[net_name])
    assert mine["net"]["mac"] == peer["mac"] == "02:00:00:00:30:01"
    assert ("up" if mine["net"]["link_up"] else "down") == peer["link"]
    assert mine["net"]["announce"] == peer["link_announce"]
    assert mine["net"]["mtu"] == peer["mtu"]
    assert mine["net"]["max_vq_pairs"] == peer.get("max_vqp")
    if "negotiated_features" in peer:
        assert set(mine["negotiated_feature_names"]) == set(peer["negotiated_features"])
    else:
        assert mine["negotiated_features"] is None
    assert mine["features"] == offered  # iproute2 6.1 does not show device features: the fd does
    assert mine == vdpad_json("dev", "config", net_name)
    assert theirs[blk_name] == {}  # iproute2 6.1 does not decode blk; test_mgmt_netlink checks it against the fd
    assert ours[blk_name]["blk"] is not None
    return mine


def test_dev_vstats(devices):
    net, _ = devices
    with VhostVdpa(net.node) as fd:
        fd.set_owner()
        fd.set_features(fd.get_features())
        fd.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK)
        for queue in range(3):
            mine = vdpad_json("dev", "stats", net.name, "--queue", str(queue))
            peer = dict(iproute("dev", "vstats", "show", net.name, "qidx", str(queue))["vstats"][net.name])
            peer.pop("queue_type")  # 6.1 misnumbers queues without MQ (0 "control_vq", 2 "rx")
            assert mine["counters"] == peer
            # so the queue type is checked against the kernel's own counter names instead
            assert {name.split()[0] for name in mine["counters"]} == {mine["queue_type"]}
