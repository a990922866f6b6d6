"""Test-wide rules: where kernel, VM boot and systemd tests run, and that CI never skips them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

IN_VM = os.environ.get("VDPAD_IN_VM") == "1"
UNDER_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BOOTED_WITH_SYSTEMD = IN_VM and Path("/run/systemd/system").is_dir()  # sd_booted(3)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "kernel" in item.keywords and not IN_VM:
            item.add_marker(pytest.mark.skip(
                reason="needs a vdpa kernel: runs inside the VM (make test, or make vm-test)"))
        if "vm_boot" in item.keywords and IN_VM:
            item.add_marker(pytest.mark.skip(reason="boots QEMU: runs on the host (make vm-test)"))
        if "systemd" in item.keywords and not BOOTED_WITH_SYSTEMD:
            item.add_marker(pytest.mark.skip(reason="needs systemd as PID 1 in the VM (make systemd-test)"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    kind = next((k for k in ("kernel", "vm_boot", "systemd") if k in item.keywords), None)
    if UNDER_CI and report.skipped and kind:
        # Under CI a kernel, VM boot or systemd test that did not run is a failure, never a skip.
        report.outcome = "failed"
        report.longrepr = f"{kind} test skipped under CI: {report.longrepr}"
