"""The recorder behind the kernel suite's last test (every public device method is called against the kernel).

Here it is checked on its own: it sees the whole public API of the device
classes, keeps signatures and behaviour, and notes calls by class.
"""

from __future__ import annotations

import inspect

import pytest

from tests.device_calls import DEVICE_CLASSES, CallRecorder, public_api
from vdpad.device import VhostNet, VhostVdpa


@pytest.mark.parametrize("cls", DEVICE_CLASSES, ids=lambda c: c.__name__)
def test_the_api_is_every_public_method_and_property(cls):
    expected = {f"{cls.__name__}.{name}" for name, value in inspect.getmembers(cls)
                if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property))}
    listed = {name for name in public_api() if name.startswith(cls.__name__ + ".")}
    assert expected and listed == expected


@pytest.fixture
def recorder():
    recorder = CallRecorder()
    recorder.install()
    yield recorder
    recorder.uninstall()


def test_calls_are_noted_by_the_class_they_were_made_on(recorder):
    with VhostVdpa("/dev/null") as dev:
        assert dev.fileno() >= 0 and not dev.closed
    assert recorder.called == {"VhostVdpa.fileno", "VhostVdpa.closed", "VhostVdpa.close"}
    assert "VhostNet.fileno" in recorder.missing() and "VhostVdpa.fileno" not in recorder.missing()


def test_wrapped_methods_keep_signature_and_errors(recorder):
    wrapped = {name: inspect.signature(getattr(VhostNet, name)) for name in ("set_mem_table", "set_backend")}
    recorder.uninstall()
    unwrapped = {name: inspect.signature(getattr(VhostNet, name)) for name in wrapped}
    recorder.install()
    assert wrapped == unwrapped
    dev = VhostVdpa("/dev/null")
    dev.close()
    with pytest.raises(ValueError, match="/dev/null"):
        dev.fileno()
    assert "VhostVdpa.fileno" in recorder.called


def test_uninstall_restores_the_classes():
    before = {(cls, name): value for cls in VhostVdpa.__mro__ + VhostNet.__mro__ for name, value in vars(cls).items()}
    recorder = CallRecorder()
    recorder.install()
    assert VhostVdpa.get_status is not before[(VhostVdpa, "get_status")]
    recorder.uninstall()
    after = {(cls, name): value for cls in VhostVdpa.__mro__ + VhostNet.__mro__ for name, value in vars(cls).items()}
    assert after == before
