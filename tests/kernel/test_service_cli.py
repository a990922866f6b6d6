"""The CLI through the daemon, and a client without privileges, in the VM.

When a daemon answers on the socket, attach and detach go through it (the
same output and exit codes as --direct); status, session list and iotlb show
ask it. A client that is neither root nor able to open the node moves frames
through a session: the daemon holds the device for it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from tests.cli import vdpad
from tests.privilege import run_as_nobody
from tests.service import running_daemon
from tests.sim import frames, iova_far_from_us
from vdpad.client import Client
from vdpad.iotlb import MemoryRegion
from vdpad.virtio import DmaArena, NetDriver

pytestmark = pytest.mark.kernel

CLIENT_GROUP = "nogroup"  # gid 65534: tests.privilege's unprivileged client is in it


@pytest.fixture(scope="module")
def daemon(sim_modules):
    with running_daemon(config=f'group = "{CLIENT_GROUP}"\n') as running:
        yield running


def cli(daemon, *args: str) -> tuple[int, str, str]:
    return vdpad(*args, "--socket", str(daemon.socket))


def device_name() -> str:
    return f"c{os.getpid() % 1000}"


def test_attach_and_detach_through_the_daemon_print_what_direct_prints(daemon):
    name = device_name()
    requests = daemon.client().status()["counters"]["requests"]
    code, out, err = cli(daemon, "attach", name, "--mgmtdev", "vdpasim_net", "--mac", "02:00:00:00:c1:01", "--json")
    assert code == 0, err
    through_daemon = json.loads(out)
    with daemon.client() as client:
        status = client.status()
    assert status["counters"]["requests"] > requests
    assert {"name": name, "mgmtdev": "vdpasim_net", "driver": "vhost_vdpa", "node": through_daemon["node"],
            "session": None} in status["devices"]
    assert f"device={name}" in daemon.log_text() and "device.attached" in daemon.log_text()
    code, _, err = cli(daemon, "detach", name)
    assert code == 0, err
    assert "device.detached" in daemon.log_text()

    code, out, err = vdpad("attach", name, "--mgmtdev", "vdpasim_net", "--mac", "02:00:00:00:c1:01", "--json",
                           "--direct", "--socket", str(daemon.socket))
    assert code == 0, err
    direct = json.loads(out)
    try:
        assert direct.keys() == through_daemon.keys()
        assert {k: v for k, v in direct.items() if k != "node"} == \
               {k: v for k, v in through_daemon.items() if k != "node"}
    finally:
        assert vdpad("detach", name, "--direct")[0] == 0
    assert daemon.client().status()["devices"] == [d for d in status["devices"] if d["name"] != name]


def test_errors_through_the_daemon_exit_as_direct_ones_do(daemon):
    for args, code in ((("attach", "x1", "--mgmtdev", "nosuch"), 3), (("detach", "nosuch"), 3),
                       (("attach", "x1", "--mgmtdev", "vdpasim_net", "--mtu", "9"), 2)):
        through, _, said = cli(daemon, *args)
        direct, _, said_direct = vdpad(*args, "--direct")
        assert through == direct == code, (args, said, said_direct)
        assert said == said_direct


def test_detach_is_refused_while_a_session_holds_the_device(daemon, vdpa_net):
    with daemon.client() as client:
        session = client.open_session(vdpa_net.name)
        code, _, err = cli(daemon, "detach", vdpa_net.name)
        assert code == 7 and f"used by session {session.number}" in err
        session.close()


def test_status_session_list_and_iotlb_show(daemon, vdpa_net):
    with daemon.client() as client, MemoryRegion(1 << 20, "ram") as ram:
        session = client.open_session(vdpa_net.name)
        session.register(ram)
        iova = iova_far_from_us(session.iova_range, ram.size)
        session.commit([session.map(iova, ram, 0, ram.size)])

        code, out, _ = cli(daemon, "status", "--json")
        status = json.loads(out)
        assert code == 0 and status["sessions"] == 1 and status["counters"]["bytes_mapped"] == ram.size
        assert status["counters"]["commits"] >= 1 and status["counters"]["iotlb_messages"] >= 1
        code, out, _ = cli(daemon, "status")
        assert code == 0 and "sessions" in out and vdpa_net.name in out

        code, out, _ = cli(daemon, "session", "list", "--json")
        (listed,) = json.loads(out)
        assert listed["session"] == session.number and listed["memory"] == [{"name": "ram", "size": ram.size}]
        code, out, _ = cli(daemon, "session", "list")
        assert code == 0 and str(vdpa_net.node) in out and str(os.getpid()) in out

        code, out, _ = cli(daemon, "iotlb", "show", vdpa_net.name, "--asid", "0", "--json")
        assert code == 0
        (space,) = json.loads(out)["spaces"]
        assert space["map"] == space["kernel"] == [
            {"iova": iova, "size": ram.size, "memory": "ram", "offset": 0, "perm": "rw"}]
        code, out, _ = cli(daemon, "iotlb", "show", str(vdpa_net.node))
        assert code == 0 and f"{iova:#x}" in out and "AS 1" in out and "in sync" in out
        code, _, err = cli(daemon, "iotlb", "show", vdpa_net.name, "--asid", "7")
        assert code == 1 and "asid 7" in err
        session.close()


def nobody_moves_frames(args: list[str]) -> None:
    """As uid 65534 (tests.privilege): no access to the node, yet frames go through a session."""
    socket_path, device, node = args
    try:
        os.open(node, os.O_RDWR)
    except PermissionError:
        pass
    else:
        sys.exit("uid 65534 could open the node itself: the test proves nothing")
    with Client(socket_path) as client, MemoryRegion(1 << 20, "nobody-ram") as ram:
        session = client.open_session(device)
        session.register(ram)
        iova = iova_far_from_us(session.iova_range, ram.size)
        session.commit([session.map(iova, ram, 0, ram.size)])
        with DmaArena(ram, iova) as arena, NetDriver(session.device, arena) as net:
            net.start()
            sent = frames(16, seed=21)
            received = net.exchange(sent)
        session.close()
    print(f"{len(received)} of {len(sent)} frames back intact: {received == sent}")


def test_a_client_without_privileges_moves_frames_through_the_daemon(daemon, vdpa_net):
    done = run_as_nobody("tests.kernel.test_service_cli:nobody_moves_frames",
                         [str(daemon.socket), vdpa_net.name, str(vdpa_net.node)])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "16 of 16 frames back intact: True"


def wait_for(what, check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.1)
    return value


def test_configured_devices_are_made_at_start_and_on_sighup_and_never_deleted(sim_modules):
    first, second = f"cfa{os.getpid() % 1000}", f"cfb{os.getpid() % 1000}"
    device = '[[device]]\nname = "{}"\nmgmtdev = "vdpasim_net"\nmac = "02:00:00:00:cf:0{}"\n'
    with running_daemon(config=device.format(first, 1)) as daemon, daemon.client() as client:
        try:
            assert client.status()["reconciled"]["created"] == [first]
            session = client.open_session(first)  # bound to vhost_vdpa: a node the daemon can open
            daemon.config.write_text(device.format(first, 1) + device.format(second, 2))
            daemon.process.send_signal(signal.SIGHUP)
            reconciled = wait_for("the reload", lambda: (r := client.status()["reconciled"]) and
                                  r["created"] == [second] and r)
            assert reconciled["in_use"] == [first]
            daemon.config.write_text("log_level = 'loud'\n")  # refused: the daemon keeps what it had
            daemon.process.send_signal(signal.SIGHUP)
            wait_for("the refusal", lambda: "daemon.reload_refused" in daemon.log_text())
            assert "log_level" in daemon.log_text()
            daemon.config.write_text("")  # neither device configured any more: neither is deleted
            daemon.process.send_signal(signal.SIGHUP)
            wait_for("the second reload", lambda: daemon.log_text().count("daemon.reloaded") == 2)
            session.reset()
            names = {d["name"] for d in client.status()["devices"]}
            assert {first, second} <= names
            session.close()
        finally:
            for name in (first, second):
                vdpad("detach", name, "--direct")


def test_status_shows_a_device_another_tool_made_within_a_second_or_so(daemon):
    """status's device walk serves a second of requests (DeviceListing); another tool's change shows after."""
    name = device_name() + "x"
    with daemon.client() as client:
        before = {d["name"] for d in client.status()["devices"]}
        assert vdpad("attach", name, "--mgmtdev", "vdpasim_net", "--direct")[0] == 0
        try:
            started = time.monotonic()
            wait_for("the device in status", lambda: name in {d["name"] for d in client.status()["devices"]}, 5)
            assert time.monotonic() - started < 3
            assert name not in before
        finally:
            assert vdpad("detach", name, "--direct")[0] == 0
