"""The VM harness against a real QEMU boot (on the host, under the VM lock: make vm-test runs these)."""

from __future__ import annotations

import gzip
import subprocess

import pytest

from tests.vm.harness import boot, prepare

pytestmark = pytest.mark.vm_boot


def test_guest_that_never_reports_is_255_with_the_console_tail(tmp_path):
    """A kernel that cannot start init: the run fails, and says why."""
    kernel, _ = prepare()
    empty = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=b"", capture_output=True, check=True)
    bogus = tmp_path / "empty.cpio.gz"
    bogus.write_bytes(gzip.compress(empty.stdout))
    result = boot(kernel, bogus, ["true"], cwd=tmp_path, timeout=120)
    assert result.returncode == 255
    assert "Kernel panic" in result.console_tail()


def test_systemd_as_pid_1_runs_the_command_and_none_of_the_hosts_units(tmp_path):
    kernel, initramfs = prepare()
    probe = ('cat /proc/1/comm >"$VDPAD_VM_OUT/pid1"; '
             'systemctl is-active vdpad-vm-run.service multi-user.target >"$VDPAD_VM_OUT/active"; '
             'systemctl list-units --state=failed --plain --no-legend >"$VDPAD_VM_OUT/failed"; exit 7')
    result = boot(kernel, initramfs, ["sh", "-c", probe], cwd=tmp_path, timeout=300, init="systemd")
    assert result.returncode == 7, result.console_tail()
    assert (result.out / "pid1").read_text() == "systemd\n"
    assert (result.out / "active").read_text() == "active\ninactive\n"
    assert (result.out / "failed").read_text() == ""
