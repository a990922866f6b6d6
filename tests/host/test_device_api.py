"""Every public method of the device classes is driven against the kernel by a VM test."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from vdpad.device import VhostNet, VhostVdpa

KERNEL_TESTS = sorted((Path(__file__).parents[1] / "kernel").glob("test_device_*.py"))


def used_names() -> set[str]:
    names = set()
    for path in KERNEL_TESTS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
    return names


@pytest.mark.parametrize("cls", [VhostVdpa, VhostNet], ids=lambda c: c.__name__)
def test_every_public_method_meets_the_kernel(cls):
    public = {name for name, _ in inspect.getmembers(cls) if not name.startswith("_")}
    assert KERNEL_TESTS, "no kernel tests of the device layer found"
    assert sorted(public - used_names()) == []
