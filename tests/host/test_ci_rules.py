"""The rule that under CI a kernel test is never skipped, checked with pytest's own pytester."""

import shutil
from pathlib import Path

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
MARKED_TEST = """
import pytest
pytestmark = pytest.mark.{marker}

def test_marked():
    assert True
"""


def _project(pytester, marker: str = "kernel"):
    """A project with the real conftest and one passing test marked `marker` (kernel or vm_boot)."""
    shutil.copy(CONFTEST, pytester.path / "conftest.py")
    pytester.makeini(f"[pytest]\nmarkers =\n    {marker}: a test that runs in one place only\n")
    pytester.makepyfile(**{f"test_{marker}": MARKED_TEST.format(marker=marker)})


def test_kernel_test_skips_outside_vm(pytester, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("VDPAD_IN_VM", raising=False)
    _project(pytester)
    pytester.runpytest_inprocess().assert_outcomes(skipped=1)


def test_kernel_test_skip_fails_under_ci(pytester, monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.delenv("VDPAD_IN_VM", raising=False)
    _project(pytester)
    result = pytester.runpytest_subprocess()
    # The skip happens at set-up, so pytest reports the failure as an error.
    result.assert_outcomes(errors=1)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*kernel test skipped under CI*"])


def test_kernel_test_runs_in_vm(pytester, monkeypatch):
    monkeypatch.setenv("VDPAD_IN_VM", "1")
    _project(pytester)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_vm_boot_test_runs_on_the_host(pytester, monkeypatch):
    monkeypatch.delenv("VDPAD_IN_VM", raising=False)
    _project(pytester, "vm_boot")
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_vm_boot_test_skip_in_the_guest_fails_under_ci(pytester, monkeypatch):
    monkeypatch.setenv("VDPAD_IN_VM", "1")
    monkeypatch.delenv("CI", raising=False)
    _project(pytester, "vm_boot")
    pytester.runpytest_subprocess().assert_outcomes(skipped=1)
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*vm_boot test skipped under CI*"])
