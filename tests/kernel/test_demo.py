"""The README's main command (`make demo`) runs the same script in the VM as this test: kept working."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service import VDPAD

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_moves_frames_through_the_daemon_across_a_persistent_reset(sim_modules):
    demo = subprocess.run(["sh", "tests/vm/guest/demo.sh"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "VDPAD": VDPAD, "PYTHON": sys.executable})
    out = demo.stdout
    assert demo.returncode == 0, out + demo.stderr
    assert out.count("32 frames out through TX and back on RX, intact") == 2, out
    assert "device reset; the kernel kept the maps" in out
    for shown in ("$ vdpad status", "$ vdpad session list", "$ vdpad iotlb show demo-net", "the daemon stopped (exit 0)"):
        assert shown in out, out
    assert not Path("/sys/bus/vdpa/devices/demo-net").exists()  # detached again
