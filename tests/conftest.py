"""Test-wide rules: where kernel tests run, and that CI never skips them."""

from __future__ import annotations

import os

import pytest

IN_VM = os.environ.get("VDPAD_IN_VM") == "1"
UNDER_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config, items):
    if IN_VM:
        return
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(pytest.mark.skip(
                reason="needs a vdpa kernel: runs inside the VM (make test, or make vm-test)"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if UNDER_CI and report.skipped and "kernel" in item.keywords:
        # Under CI a kernel test that did not run is a failure, never a skip.
        report.outcome = "failed"
        report.longrepr = f"kernel test skipped under CI: {report.longrepr}"
