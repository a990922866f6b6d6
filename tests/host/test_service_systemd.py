"""sd_notify, socket activation and the watchdog interval against real sockets and processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vdpad.service import systemd
from vdpad.service.systemd import SystemdEnvError

UNITS = Path(__file__).resolve().parents[2] / "systemd"
SYSTEMD_VARS = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID")


@pytest.fixture(autouse=True)
def no_systemd_env(monkeypatch):
    for name in SYSTEMD_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def manager(tmp_path, monkeypatch):
    """A datagram socket standing where the service manager listens; NOTIFY_SOCKET names its path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        yield sock


def test_notify_without_a_manager_sends_nothing():
    assert systemd.notify(ready=True) is False


def test_notify_sends_one_datagram_of_assignments(manager):
    assert systemd.notify(ready=True, status="1 devices, 0 sessions, 0 clients") is True
    assert manager.recv(4096) == b"READY=1\nSTATUS=1 devices, 0 sessions, 0 clients\n"
    assert systemd.notify(stopping=True, watchdog=True) is True
    assert manager.recv(4096) == b"STOPPING=1\nWATCHDOG=1\n"
    assert systemd.notify(reloading=True) is True
    assert manager.recv(4096) == b"RELOADING=1\n"


def test_notify_to_an_abstract_socket(monkeypatch):
    name = f"vdpad-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify(watchdog=True) is True
        assert sock.recv(4096) == b"WATCHDOG=1\n"


def test_notify_refuses_a_status_of_two_lines_and_sends_nothing(manager):
    with pytest.raises(ValueError, match="STATUS is one line"):
        systemd.notify(status="ready\nREADY=1")
    manager.setblocking(False)
    with pytest.raises(BlockingIOError):
        manager.recv(4096)


def test_notify_with_nothing_to_say_is_an_error(manager):
    with pytest.raises(ValueError, match="at least one"):
        systemd.notify()


def test_notify_socket_that_is_no_address_is_named(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "run/notify")
    with pytest.raises(SystemdEnvError, match=r"\$NOTIFY_SOCKET='run/notify' is neither a path"):
        systemd.notify(ready=True)


def test_notify_to_a_socket_nobody_listens_on_is_false_not_an_exception(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert systemd.notify(watchdog=True) is False


# A child process stands in for what systemd's exec does: the listening socket
# on fd 3, LISTEN_PID its own pid; it reports what listen_fds() made of it.
CHILD = textwrap.dedent("""
    import json, os, socket, sys
    from vdpad.service import systemd
    os.dup2(int(sys.argv[1]), 3, inheritable=True)
    os.close(int(sys.argv[1]))
    os.environ.update(LISTEN_PID=sys.argv[2] or str(os.getpid()), LISTEN_FDS=sys.argv[3], LISTEN_FDNAMES="control")
    try:
        found = systemd.listen_fds()
    except ValueError as error:
        found, problem = [], str(error)
    else:
        problem = None
    left = [k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ]
    report = {"fds": [s.fileno() for s in found], "problem": problem, "env_left": left,
              "types": [int(s.type) for s in found],
              "cloexec": [not os.get_inheritable(s.fileno()) for s in found]}
    if found:
        conn, _ = found[0].accept()
        conn.send(b"accepted")
        conn.close()
    print(json.dumps(report), flush=True)
""")


def run_child(fd: int, *, pid: str = "", count: str = "1") -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(fd), pid, count], pass_fds=(fd,),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_listen_fds_takes_the_passed_listener_and_clears_the_environment(tmp_path):
    path = str(tmp_path / "control.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(path)
        listener.listen()
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
            client.connect(path)  # queued in the backlog until the child accepts
            report = run_child(listener.fileno())
            client.settimeout(5)
            assert client.recv(64) == b"accepted"
    assert report == {"fds": [3], "problem": None, "env_left": [], "types": [int(socket.SOCK_SEQPACKET)],
                      "cloexec": [True]}


def test_listen_fds_meant_for_another_process_are_left_alone(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        report = run_child(listener.fileno(), pid="1")
    assert report == {"fds": [], "problem": None, "env_left": [], "types": [], "cloexec": []}


def test_listen_fds_that_is_not_a_socket_is_named(tmp_path):
    read_end, write_end = os.pipe()
    try:
        report = run_child(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert report["fds"] == [] and report["env_left"] == []
    assert report["problem"].startswith("$LISTEN_FDS=1: fd 3 is not a socket")


def test_listen_fds_count_that_is_no_number_is_named_and_cleared(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "two")
    with pytest.raises(SystemdEnvError, match=r"\$LISTEN_FDS='two' is not a decimal number"):
        systemd.listen_fds()
    assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ


def test_listen_fds_outside_systemd_is_empty():
    assert systemd.listen_fds() == []


def test_watchdog_interval_is_half_the_timeout(monkeypatch):
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    assert systemd.watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 1.5


def test_watchdog_of_another_process_is_not_ours(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd.watchdog_interval() is None


@pytest.mark.parametrize(("name", "value", "problem"), [
    ("WATCHDOG_USEC", "3s", "is not a decimal number"),
    ("WATCHDOG_USEC", "0", "is below 1"),
    ("WATCHDOG_PID", "me", "is not a decimal number"),
])
def test_watchdog_variables_that_make_no_sense_are_named(monkeypatch, name, value, problem):
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemdEnvError, match=rf"\${name}='{value}' {problem}"):
        systemd.watchdog_interval()


# ------------------------------------------------------------------ the units
@pytest.fixture
def units(tmp_path) -> Path:
    """The units as a checkout installs them: a drop-in points ExecStart at its virtualenv (systemd/README.md)."""
    for unit in ("vdpad.service", "vdpad.socket"):
        shutil.copy(UNITS / unit, tmp_path / unit)
    (tmp_path / "vdpad.service.d").mkdir()
    (tmp_path / "vdpad.service.d" / "checkout.conf").write_text(
        f"[Service]\nExecStart=\nExecStart={Path(sys.executable).with_name('vdpad')} serve\n")
    return tmp_path


def test_units_verify_clean(units):
    proc = subprocess.run(["systemd-analyze", "verify", units / "vdpad.socket", units / "vdpad.service"],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_service_exposure_is_at_most_4(units):
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", units / "vdpad.service"],
                          capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for vdpad\.service: (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    assert float(found.group(1)) <= 4.0, proc.stdout
