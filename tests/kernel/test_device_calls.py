"""Every public method and property of the device classes was called against the kernel in this session.

tests/kernel/conftest.py wraps them all at the start of the session and runs
this test last. A run narrowed (-k) to leave it out asserts nothing; a run
that selects it must have called everything.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.kernel


def test_every_public_device_method_was_called(device_calls):
    assert device_calls.api, "found no public methods on the device classes"
    missing = device_calls.missing()
    assert not missing, f"no kernel test called: {', '.join(missing)}"
