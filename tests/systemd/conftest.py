"""Fixtures for tests that run in the guest booted with systemd as PID 1 (make systemd-test).

The units under test are the repository's own (systemd/), installed into the
guest's /etc/systemd/system (a tmpfs overlay: nothing on the host changes)
with one drop-in that points ExecStart at this checkout's virtualenv, as
systemd/README.md tells a checkout to do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import BOOTED_WITH_SYSTEMD

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
SYSTEM = Path("/etc/systemd/system")
VDPAD = Path(sys.executable).with_name("vdpad")
# The modules must be in before vdpad.service starts: DeviceAllow=char-vhost-vdpa
# is resolved through /proc/devices at start.
MODULES = ("vhost_vdpa", "vhost_net", "vdpa_sim_net")
WATCHDOG_SEC = 6
# What the daemon of a checkout runs from: the checkout (an editable install), its virtualenv, the Python
# that made it. ProtectHome=yes hides /root and /home (a pyenv Python lives there), PrivateTmp=yes hides
# /tmp (a CI checkout made with mktemp): the drop-in relaxes just the one that hides them.
RUNS_FROM = [Path(os.path.realpath(p)) for p in (sys.executable, VDPAD, REPO)]


def _under(*tops: str) -> bool:
    return any(path.is_relative_to(top) for path in RUNS_FROM for top in tops)


DROP_IN = f"""[Service]
ExecStart=
ExecStart={VDPAD} serve
Environment=VDPAD_LOG=debug
WatchdogSec={WATCHDOG_SEC}s
""" + ("ProtectHome=read-only\n" if _under("/root", "/home", "/run/user") else "") \
    + ("PrivateTmp=no\n" if _under("/tmp", "/var/tmp") else "")


def run(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc


def show(unit: str, *properties: str) -> dict[str, str]:
    """`systemctl show` of the unit's properties."""
    out = run("systemctl", "show", unit, *(f"--property={p}" for p in properties)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_for(check: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g} s; journal:\n"
                                 + run("journalctl", "-u", "vdpad", "--no-pager", "-n", "40", check=False).stdout)
        time.sleep(0.2)


@pytest.fixture(scope="session")
def installed() -> Iterator[None]:
    """vdpad.socket and vdpad.service installed with the checkout's drop-in, the socket listening."""
    run("modprobe", "-a", *MODULES)
    for unit in ("vdpad.service", "vdpad.socket"):
        shutil.copy(UNITS / unit, SYSTEM / unit)
    (SYSTEM / "vdpad.service.d").mkdir(exist_ok=True)
    (SYSTEM / "vdpad.service.d" / "checkout.conf").write_text(DROP_IN)
    run("systemctl", "daemon-reload")
    run("systemctl", "start", "vdpad.socket")
    try:
        yield
    finally:
        run("systemctl", "stop", "vdpad.socket", "vdpad.service", check=False)


@pytest.fixture
def vdpad(installed) -> Iterator[None]:
    """Each test starts from a stopped daemon (the socket listening) and leaves it stopped."""
    run("systemctl", "stop", "vdpad.service")
    run("systemctl", "reset-failed", "vdpad.service", check=False)
    yield
    run("systemctl", "stop", "vdpad.service", check=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test shows what the service said (the daemon's own events, systemd's about it)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "systemd" in item.keywords and BOOTED_WITH_SYSTEMD:
        journal = run("journalctl", "-u", "vdpad.service", "-u", "vdpad.socket", "--no-pager", "-n", "60",
                      "-o", "short-monotonic", check=False)
        report.sections.append(("journal of vdpad", journal.stdout + journal.stderr))
