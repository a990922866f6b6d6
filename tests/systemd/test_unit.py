"""vdpad.socket and vdpad.service under the real systemd, with all their hardening: socket
activation, READY/STATUS, the watchdog, a clean stop, and the journal's fields."""

from __future__ import annotations

import errno
import json
import re
import time
from pathlib import Path

import pytest

from tests.sim import frames, sim_mode, vdpa_device
from tests.systemd.conftest import VDPAD, WATCHDOG_SEC, run, show, wait_for
from tests.tap import tap_device
from tests.viommu import net_rig
from vdpad.client import Client
from vdpad.device import VhostVdpa
from vdpad.iotlb import MemoryRegion

pytestmark = pytest.mark.systemd


def status() -> dict:
    return json.loads(run(VDPAD, "status", "--json").stdout)


def test_a_client_starts_the_daemon_through_the_socket(vdpad):
    assert show("vdpad.service", "ActiveState")["ActiveState"] == "inactive"
    assert show("vdpad.socket", "SubState")["SubState"] == "listening"
    record = status()  # the first connection starts vdpad.service (Type=notify: READY=1 ends the start)
    unit = show("vdpad.service", "ActiveState", "SubState", "MainPID", "StatusText", "NotifyAccess")
    assert unit["ActiveState"] == "active" and unit["SubState"] == "running"
    assert int(unit["MainPID"]) == record["pid"]
    assert re.search(r"\b0 session", unit["StatusText"]), unit["StatusText"]
    assert "Status: \"" in run("systemctl", "status", "vdpad", "--no-pager", check=False).stdout


def test_status_follows_the_sessions(vdpad):
    with vdpa_device("sdstat0", "vdpasim_net"), Client() as client:
        client.open_session("sdstat0")
        wait_for(lambda: re.search(r"\b1 session", show("vdpad.service", "StatusText")["StatusText"]) is not None,
                 "STATUS= naming the open session", 10)


def test_a_daemon_that_stops_answering_is_killed_by_the_watchdog_and_restarted(vdpad):
    first = status()["pid"]
    before = int(show("vdpad.service", "NRestarts")["NRestarts"])
    time.sleep(2 * WATCHDOG_SEC)  # twice the timeout: still the same daemon only because its loop pings
    assert status()["pid"] == first and int(show("vdpad.service", "NRestarts")["NRestarts"]) == before
    run("systemctl", "kill", "--signal=SIGSTOP", "vdpad.service")
    started = time.monotonic()

    def restarted() -> bool:
        unit = show("vdpad.service", "NRestarts", "MainPID", "ActiveState")
        return (int(unit["NRestarts"]) > before and unit["MainPID"] not in ("0", str(first))
                and unit["ActiveState"] == "active")

    wait_for(restarted, "a restart after the watchdog", 3 * WATCHDOG_SEC + 30)
    took = time.monotonic() - started
    assert took >= WATCHDOG_SEC - 1, f"restarted after {took:.1f} s, before the watchdog could fire"
    journal = run("journalctl", "-u", "vdpad", "--no-pager", "-o", "cat").stdout
    assert "Watchdog timeout" in journal
    assert status()["pid"] == int(show("vdpad.service", "MainPID")["MainPID"]) != first


def test_the_daemon_creates_binds_and_deletes_a_device(vdpad):
    """Netlink DEV_NEW/DEL and the sysfs driver binding, from inside the sandbox."""
    with Client() as client:
        record = client.attach("sdatt0", "vdpasim_net", mac="02:00:00:00:00:09")
        try:
            assert record["driver"] == "vhost_vdpa" and record["node"].startswith("/dev/vhost-vdpa-")
            assert Path("/sys/bus/vdpa/devices/sdatt0/driver_override").read_text().strip() == "vhost_vdpa"
            client.open_session("sdatt0").close()
        finally:
            client.detach("sdatt0")
    assert not Path("/sys/bus/vdpa/devices/sdatt0").exists()


def test_stop_releases_every_device(vdpad):
    with vdpa_device("sdstop0", "vdpasim_net") as node, Client() as client:
        session = client.open_session("sdstop0")
        with MemoryRegion(1 << 20, "ram") as ram:
            session.register(ram)
            with pytest.raises(OSError) as held:
                VhostVdpa(node).close()
            assert held.value.errno == errno.EBUSY  # the daemon holds the node
            run("systemctl", "stop", "vdpad.service")
            assert show("vdpad.service", "ActiveState", "Result") == {"ActiveState": "inactive",
                                                                      "Result": "success"}
            with VhostVdpa(node) as dev:  # released: the node opens again
                dev.get_device_id()


def test_device_access_is_fixed_when_the_daemon_starts(vdpad):
    """DeviceAllow=char-vhost-vdpa names a major that exists only once vhost_vdpa is loaded."""
    run("modprobe", "-r", "vhost_vdpa")
    try:
        status()  # started without the module: no vhost-vdpa major to allow
    finally:
        run("modprobe", "vhost_vdpa")
    with vdpa_device("sdacl0", "vdpasim_net"), Client() as client:
        with pytest.raises(OSError) as refused:
            client.open_session("sdacl0")
        assert refused.value.errno == errno.EPERM, refused.value
        run("systemctl", "restart", "vdpad.service")
        with Client() as again:
            again.open_session("sdacl0").close()


PINNED = 32 << 20  # beyond systemd's default LimitMEMLOCK (8M)


def test_pinned_memory_needs_the_units_memlock_limit_not_a_capability(vdpad):
    """PA mode: vhost-vdpa pins what the daemon maps against its RLIMIT_MEMLOCK (no CAP_IPC_LOCK kept)."""
    with sim_mode(use_va=False), vdpa_device("sdpin0", "vdpasim_net"):
        with Client() as client, MemoryRegion(PINNED, "ram") as ram:
            session = client.open_session("sdpin0")
            session.register(ram)
            session.commit([session.map(session.iova_range.first, ram, 0, ram.size)])
            assert status()["counters"]["bytes_pinned"] >= PINNED
        run("systemctl", "stop", "vdpad.service")  # the device is free before it is deleted


def test_the_journal_carries_the_events_fields(vdpad):
    with vdpa_device("sdlog0", "vdpasim_net"), Client() as client, MemoryRegion(1 << 20, "ram") as ram:
        session = client.open_session("sdlog0")
        session.register(ram)
        iova = session.iova_range.first
        session.commit([session.map(iova, ram, 0, ram.size)])
        number = session.info["session"]
    pid = status()["pid"]
    entries = [json.loads(line) for line in
               run("journalctl", f"_PID={pid}", "-o", "json", "--no-pager").stdout.splitlines()]
    committed = [e for e in entries if e.get("EVENT") == "iotlb.committed"]
    assert committed, [e.get("MESSAGE") for e in entries]
    entry = committed[-1]
    assert (entry["DEVICE"], entry["SESSION"], entry["OP"], entry["ASID"]) == ("sdlog0", str(number),
                                                                               "iotlb.commit", "0")
    assert entry["SYSLOG_IDENTIFIER"] == "vdpad" and entry["PRIORITY"] == "7"
    assert entry["_SYSTEMD_UNIT"] == "vdpad.service"
    ready = [e for e in entries if e.get("EVENT") == "daemon.ready"]
    assert ready and ready[0]["ACTIVATED"] == "True" and ready[0]["PRIORITY"] == "6"


def test_the_unit_reads_the_default_configuration_and_reload_reads_it_again(vdpad):
    """/etc/vdpad/vdpad.toml without --config: devices made at start; `systemctl reload` makes new ones."""
    config = Path("/etc/vdpad/vdpad.toml")
    config.parent.mkdir(exist_ok=True)
    config.write_text('[[device]]\nname = "sdconf0"\nmgmtdev = "vdpasim_net"\n')
    try:
        assert status()["reconciled"]["created"] == ["sdconf0"]
        assert Path("/sys/bus/vdpa/devices/sdconf0").exists()
        config.write_text(config.read_text() + '[[device]]\nname = "sdconf1"\nmgmtdev = "vdpasim_net"\n')
        run("systemctl", "reload", "vdpad.service")
        wait_for(lambda: Path("/sys/bus/vdpa/devices/sdconf1").exists(), "the device the reload added", 20)
        assert status()["reconciled"]["created"] == ["sdconf1"]
    finally:
        config.unlink()
        run("systemctl", "stop", "vdpad.service")
        for name in ("sdconf0", "sdconf1"):
            run(VDPAD, "detach", name, "--direct", check=False)


def test_a_vhost_net_session_is_served_by_misses_under_the_hardened_unit(vdpad):
    """/dev/vhost-net (DeviceAllow), a passed tap and the miss service's thread under the system call filter."""
    with Client() as client, tap_device("sdtap0") as tap, net_rig(client, tap, "sd") as rig:
        sent = frames(4, seed=21)
        rig.driver.send(sent)
        assert tap.receive(4) == sent
        misses = rig.misses()
        assert misses["served"] >= 1 and misses["running"] and misses["unmapped"] == 0
        assert status()["counters"]["misses_served"] >= misses["served"]
