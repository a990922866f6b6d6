"""`vdpad attach / dev / mgmtdev / detach` against vdpa_sim: what an operator and a script see."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.cli import vdpad
from tests.privilege import run_cli
from vdpad.device import VhostVdpa
from vdpad.mgmt import VdpaNetlink

pytestmark = pytest.mark.kernel


def device_names() -> set[str]:
    with VdpaNetlink() as nl:
        return {d.name for d in nl.devices()}


@pytest.fixture
def clean(sim_modules):
    """Checks that the test leaves no device behind, then removes any it did leave."""
    before = device_names()
    yield
    left = device_names() - before
    for name in left:
        vdpad("detach", name)
    assert not left, f"left behind: {left}"


def test_attach_inspect_detach_net(clean):
    code, out, err = vdpad("attach", "cli-net0", "--mgmtdev", "vdpasim_net", "--mac", "02:00:00:00:20:01",
                           "--mtu", "9000")
    assert (code, err) == (0, "")
    node = Path(out.strip())
    assert node.parent == Path("/dev") and node.name.startswith("vhost-vdpa-")
    assert stat.S_ISCHR(node.stat().st_mode)

    code, out, _ = vdpad("dev", "show", "cli-net0", "--json")
    shown = json.loads(out)
    assert code == 0
    assert shown["node"] == str(node)
    assert (shown["class"], shown["mgmtdev"], shown["driver"], shown["max_vqs"]) == (
        "net", "vdpasim_net", "vhost_vdpa", 3)

    code, out, _ = vdpad("dev", "list", "--json")
    assert code == 0 and shown in json.loads(out)
    code, out, _ = vdpad("dev", "list")
    header, *rows = out.splitlines()
    assert header.split() == ["NAME", "MGMTDEV", "CLASS", "VENDOR", "MAX_VQS", "VQ_SIZE", "DRIVER", "NODE"]
    assert ["cli-net0", "vdpasim_net", "net", "0", "3", "256", "vhost_vdpa", str(node)] in [r.split() for r in rows]

    code, out, _ = vdpad("dev", "config", "cli-net0", "--json")
    config = json.loads(out)
    assert code == 0
    assert (config["net"]["mac"], config["net"]["mtu"], config["net"]["link_up"]) == ("02:00:00:00:20:01", 9000, True)
    assert {"MAC", "MTU", "VERSION_1"} <= set(config["feature_names"])
    code, out, _ = vdpad("dev", "config", "cli-net0")
    assert "02:00:00:00:20:01" in out and "mtu" in out

    code, _, err = vdpad("dev", "set", "cli-net0", "--mac", "02:00:00:00:20:02")
    assert (code, err) == (0, "")
    assert json.loads(vdpad("dev", "config", "cli-net0", "--json")[1])["net"]["mac"] == "02:00:00:00:20:02"

    assert vdpad("detach", "cli-net0") == (0, "", "")
    assert not node.exists()
    code, _, err = vdpad("dev", "show", "cli-net0")
    assert code == 3 and "cli-net0" in err and "device not found" in err


def test_attach_inspect_detach_blk(clean):
    code, out, _ = vdpad("attach", "cli-blk0", "-m", "vdpasim_blk", "--json")
    attached = json.loads(out)
    assert code == 0
    assert (attached["name"], attached["class"], attached["driver"]) == ("cli-blk0", "block", "vhost_vdpa")
    assert Path(attached["node"]).exists()

    code, out, _ = vdpad("dev", "config", "cli-blk0", "--json")
    blk = json.loads(out)["blk"]
    assert code == 0
    assert (blk["capacity"], blk["blk_size"], blk["seg_max"], blk["flush"]) == (0x40000, 512, 32, True)
    code, out, _ = vdpad("dev", "config", "--json")  # every device: the dump
    assert any(c["name"] == "cli-blk0" and c["blk"] == blk for c in json.loads(out))

    code, _, err = vdpad("dev", "stats", "cli-blk0", "--queue", "0")
    assert code == 6 and "not supported" in err.lower()

    assert vdpad("detach", "cli-blk0")[0] == 0
    assert "cli-blk0" not in device_names()


def test_virtio_vdpa_netdev_and_its_counters(clean):
    subprocess.run(["modprobe", "virtio_vdpa"], check=True)
    code, out, err = vdpad("attach", "cli-net1", "-m", "vdpasim_net", "--driver", "virtio_vdpa",
                           "--mac", "02:00:00:00:20:03")  # without one vdpa_sim offers 00:00:.., which will not go up
    assert code == 0, err
    ifname = out.strip()
    assert Path("/sys/class/net", ifname).is_dir()

    subprocess.run(["ip", "link", "set", "dev", ifname, "up"], check=True)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
        raw.bind((ifname, 0))
        frame = b"\xff" * 6 + bytes.fromhex("020000002003") + b"\x88\xb5" + bytes(46)  # local experimental type
        raw.send(frame)
    tx = json.loads(vdpad("dev", "stats", "cli-net1", "--queue", "1", "--json")[1])
    assert tx["queue_type"] == "tx"
    assert tx["counters"]["tx packets"] >= 1 and tx["counters"]["tx bytes"] >= len(frame)

    code, out, _ = vdpad("dev", "stats", "cli-net1", "--queue", "1")
    assert code == 0 and "tx packets" in out
    assert vdpad("detach", "cli-net1")[0] == 0
    assert not Path("/sys/class/net", ifname).exists()


def test_stats_before_negotiation_say_why(sim_device):
    dev = sim_device("vdpasim_net")
    code, _, err = vdpad("dev", "stats", dev.name, "--queue", "0")
    assert code == 1 and "feature negotiation not complete" in err


def test_mgmtdev_list_and_show(sim_modules):
    code, out, _ = vdpad("mgmtdev", "list", "--json")
    listed = {m["mgmtdev"]: m for m in json.loads(out)}
    assert code == 0
    assert listed["vdpasim_net"]["classes"] == ["net"] and listed["vdpasim_blk"]["classes"] == ["block"]
    assert json.loads(vdpad("mgmtdev", "show", "vdpasim_net", "--json")[1]) == listed["vdpasim_net"]
    code, out, _ = vdpad("mgmtdev", "list")
    assert out.splitlines()[0].split() == ["MGMTDEV", "CLASSES", "MAX_VQS", "FEATURES"]
    assert vdpad("mgmtdev", "show", "nope")[0] == 3


# -- failures: one line, a documented exit code, nothing left behind -----------------
@pytest.mark.parametrize("args, code, text", [
    (["-m", "vdpasim_net", "--mac", "02:00:00:00:00"], 2, "mac="),
    (["-m", "vdpasim_net", "--mac", "03:00:00:00:00:01"], 2, "multicast"),
    (["-m", "vdpasim_net", "--mtu", "67"], 2, "mtu=67"),
    (["-m", "vdpasim_net", "--mtu", "65536"], 2, "mtu=65536"),
    (["-m", "vdpasim_blk", "--mac", "02:00:00:00:20:04"], 2, "apply to net devices"),
    (["-m", "bus/"], 2, "NAME or BUS/NAME"),
    (["-m", "nope"], 3, "there are: vdpasim_net"),
    (["-m", "vdpasim_net", "--max-vqp", "2"], 6, "not supported"),
])
def test_attach_refusals(clean, args, code, text):
    with capture_logs() as events:
        got, out, err = vdpad("attach", "cli-bad", *args)
    assert (got, out) == (code, "")
    assert text in err and len(err.strip().splitlines()) == 1
    sent = [e.get("cmd") for e in events if e["event"] == "netlink"]
    if code == 2:
        assert "DEV_NEW" not in sent  # refused before the kernel was asked


def test_duplicate_name_leaves_the_first_alone(clean, sim_device):
    dev = sim_device("vdpasim_net")
    code, _, err = vdpad("attach", dev.name, "-m", "vdpasim_blk")
    assert code == 4 and "File exists" in err
    shown = json.loads(vdpad("dev", "show", dev.name, "--json")[1])
    assert (shown["mgmtdev"], shown["node"]) == ("vdpasim_net", str(dev.node))


def test_detach_refuses_while_the_node_is_open(sim_device):
    dev = sim_device("vdpasim_net")
    fd = os.open(dev.node, os.O_RDWR)
    try:
        code, _, err = vdpad("detach", dev.name)
        assert code == 7 and f"pid {os.getpid()}" in err
        assert dev.name in device_names()
    finally:
        os.close(fd)


def test_detach_of_an_unknown_device(sim_modules):
    code, _, err = vdpad("detach", "cli-none")
    assert code == 3 and "cli-none" in err


def _unloaded(module: str) -> None:
    subprocess.run(["modprobe", "-r", module], check=True, capture_output=True)


def test_missing_mgmtdev_module_is_named(clean):
    _unloaded("vdpa_sim_blk")
    try:
        code, _, err = vdpad("attach", "cli-blk1", "-m", "vdpasim_blk")
        assert code == 6 and "modprobe vdpa_sim_blk" in err
    finally:
        subprocess.run(["modprobe", "vdpa_sim_blk"], check=True)


def test_missing_driver_module_is_named_before_anything_is_made(clean):
    _unloaded("virtio_vdpa")
    with capture_logs() as events:
        code, _, err = vdpad("attach", "cli-net2", "-m", "vdpasim_net", "--driver", "virtio_vdpa")
    assert code == 6 and "modprobe virtio_vdpa" in err
    assert not [e for e in events if e.get("cmd") == "DEV_NEW"]


def test_without_cap_net_admin(clean):
    proc = run_cli(["attach", "cli-net3", "-m", "vdpasim_net"])
    assert proc.returncode == 5 and "CAP_NET_ADMIN" in proc.stderr and proc.stdout == ""


def test_a_bind_that_fails_after_dev_new_deletes_the_device(clean):
    """CAP_NET_ADMIN without root: DEV_NEW works, the sysfs writes of binding do not."""
    subprocess.run(["modprobe", "virtio_vdpa"], check=True)
    proc = run_cli(["attach", "cli-net4", "-m", "vdpasim_net", "--driver", "virtio_vdpa"],
                   capabilities=["CAP_NET_ADMIN"], env=os.environ | {"VDPAD_LOG": "debug"})
    assert proc.returncode == 5, proc.stderr
    assert "cmd=DEV_NEW" in proc.stderr and "cmd=DEV_DEL" in proc.stderr  # made, then undone
    assert "vdpad: unbinding cli-net4 from vhost_vdpa: Permission denied" in proc.stderr
    assert "cli-net4 was deleted again" in proc.stderr
    assert "cli-net4" not in device_names()


def test_attach_with_feature_names_offers_exactly_those(clean):
    wanted = "VERSION_1,ACCESS_PLATFORM,MAC,STATUS"
    code, out, err = vdpad("attach", "cli-feat0", "--mgmtdev", "vdpasim_net", "--mac", "02:00:00:00:20:09",
                           "--features", wanted)
    assert (code, err) == (0, "")
    with VhostVdpa(out.strip()) as fd:
        offered = fd.get_features()
    code, out, _ = vdpad("dev", "config", "cli-feat0", "--json")
    assert code == 0
    assert json.loads(out)["features"] == offered
    assert set(json.loads(out)["feature_names"]) == set(wanted.split(","))
    assert vdpad("detach", "cli-feat0")[0] == 0


def test_attach_with_an_unknown_feature_name_is_a_usage_error(clean):
    code, _, err = vdpad("attach", "cli-feat1", "--mgmtdev", "vdpasim_net", "--features", "VERSION_1,WARP_DRIVE")
    assert code == 2
    assert "unknown feature 'WARP_DRIVE'" in err
