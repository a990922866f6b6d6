"""holders(): who keeps a node open, matched by what the file is, not by the path that reached it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vdpad.mgmt.binding import holders

# ctypes, not the mmap module: that keeps a dup of the fd for as long as the mapping lives.
MAP_AND_CLOSE = """
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
fd = os.open(sys.argv[1], os.O_RDWR)
assert libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0) != ctypes.c_void_p(-1).value
os.close(fd)
print("ready", flush=True)
sys.stdin.read()
"""

HOLD_OPEN = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print("ready", flush=True)
sys.stdin.read()
"""


@contextmanager
def child(program: str, path: Path) -> Iterator[int]:
    """A process running `program` on `path` until the block ends: its pid."""
    proc = subprocess.Popen([sys.executable, "-c", program, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        yield proc.pid
    finally:
        proc.stdin.close()
        proc.wait(5)
        proc.stdout.close()
        proc.stderr.close()


def fd_targets(pid: int) -> set[str]:
    fd_dir = Path(f"/proc/{pid}/fd")
    return {os.readlink(fd) for fd in fd_dir.iterdir()}


def test_a_mapping_holds_after_its_fd_is_closed(tmp_path):
    data = tmp_path / "mapped"
    data.write_bytes(bytes(4096))
    with child(MAP_AND_CLOSE, data) as pid:
        assert str(data) not in fd_targets(pid)  # only the mapping is left
        assert pid in holders(data)
    assert pid not in holders(data)


def test_the_same_file_through_a_symlink(tmp_path):
    data = tmp_path / "data"
    data.write_bytes(b"x")
    link = tmp_path / "link"
    link.symlink_to(data)
    with child(HOLD_OPEN, data) as pid:
        assert pid in holders(link)
    with child(HOLD_OPEN, link) as pid:
        assert pid in holders(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs CAP_MKNOD")
def test_the_same_char_device_through_a_second_node(tmp_path):
    null = os.stat("/dev/null")
    second = tmp_path / "null-again"
    os.mknod(second, stat.S_IFCHR | 0o600, null.st_rdev)
    with child(HOLD_OPEN, second) as pid:
        assert "/dev/null" not in fd_targets(pid)
        assert pid in holders(Path("/dev/null"))
        assert pid in holders(second)
    assert pid not in holders(second)
