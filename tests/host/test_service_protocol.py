"""The control protocol on the host: messages and fds over a real SOCK_SEQPACKET pair, errors across it."""

from __future__ import annotations

import errno
import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.host.test_iotlb_plan import maps, pieces_of

from vdpad.cli.output import exit_code
from vdpad.device.errors import InvalidArgument, NotSupportedError, VhostError
from vdpad.iotlb.memory import RegionInUse
from vdpad.mgmt.errors import AlreadyExists, Busy, NotFound, PermissionDenied, WaitTimeout
from vdpad.service import wire
from vdpad.iotlb.tree import MappingTree
from vdpad.service.sessions import page_of
from vdpad.service.protocol import MAX_FDS, MAX_MESSAGE, ProtocolError, RemoteError, Unauthorized, error_reply, remote_error


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a, b


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_message_and_its_fds_arrive_together(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        wire.send(a, {"op": "x", "n": 1}, [w, r])
        wire.send(a, {"op": "y"})
        message, fds = wire.receive(b)
        with fds:
            assert message == {"op": "x", "n": 1} and len(fds) == 2
            os.write(fds[0], b"hi")  # a duplicate of w: the same pipe
            assert os.read(r, 2) == b"hi"
        second, none = wire.receive(b)
        assert second == {"op": "y"} and len(none) == 0
    finally:
        os.close(r)
        os.close(w)


def test_received_fds_are_closed_once_and_then_refused(pair):
    a, b = pair
    before = open_fds()
    wire.send(a, {}, [0, 1, 2])
    _, fds = wire.receive(b)
    assert open_fds() == before + 3
    fds.close()
    fds.close()
    assert open_fds() == before
    with pytest.raises(ProtocolError, match="fd 1 is closed"):
        fds[1]
    with pytest.raises(ProtocolError, match="fd 3 was named but the message passed 3"):
        fds[3]


def test_too_many_fds_are_refused_and_none_is_kept(pair):
    a, b = pair
    before = open_fds()
    a.sendmsg([b"{}"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(4 * (MAX_FDS + 4)))])
    with pytest.raises(ProtocolError, match=f"more fds than the limit of {MAX_FDS}"):
        wire.receive(b)
    assert open_fds() == before
    with pytest.raises(ProtocolError, match="over the limit"):
        wire.ancillary([0] * (MAX_FDS + 1))


@pytest.mark.parametrize("data, words", [(b"{x", "not JSON"), (b"\xff", "not JSON"), (b"3", "JSON int")])
def test_what_is_not_a_json_object_is_refused_naming_why(pair, data, words):
    a, b = pair
    a.sendmsg([data], wire.ancillary([0]))
    before = open_fds()
    with pytest.raises(ProtocolError, match=words):
        wire.receive(b)
    assert open_fds() == before  # the fd that came with it was closed


def test_an_oversized_message_is_refused(pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_MESSAGE)
    a.send(b" " * (MAX_MESSAGE + 10))
    with pytest.raises(ProtocolError, match="over the limit"):
        wire.receive(b)
    with pytest.raises(ProtocolError, match="over the limit"):
        wire.encode({"x": "y" * MAX_MESSAGE})


def test_a_gone_peer_reads_as_none(pair):
    a, b = pair
    a.close()
    assert wire.receive(b) is None


@pytest.mark.parametrize("error", [
    InvalidArgument("MAP", "dev", "bad"), NotSupportedError("GET_VRING_SIZE", "dev", errno=errno.EOPNOTSUPP),
    NotFound(errno.ENODEV, "no such"), AlreadyExists(errno.EEXIST, "there"), PermissionDenied(errno.EPERM, "no"),
    Busy(errno.EBUSY, "busy"), WaitTimeout(errno.ETIMEDOUT, "late"), VhostError(errno.EFAULT, "UPDATE", "dev"),
    RegionInUse("mapped"), Unauthorized(errno.EACCES, "not yours"), ProtocolError("bad"),
    OSError(errno.EBUSY, "open elsewhere"), FileNotFoundError(errno.ENOENT, "gone"),
])
def test_an_error_crosses_as_its_own_kind_with_the_same_exit_code(error):
    remote = remote_error(error_reply(error))
    assert isinstance(remote, RemoteError)
    assert str(remote) == str(error)
    assert exit_code(remote) == exit_code(error)
    if isinstance(error, OSError):
        assert remote.errno == error.errno
    if isinstance(error, NotSupportedError):
        assert isinstance(remote, NotSupportedError)  # the virtio driver's fallback catches it


def test_an_unexpected_error_is_internal_and_keeps_its_notes():
    error = KeyError("x")
    error.add_note("while doing y")
    reply = error_reply(error)
    assert reply["kind"] == "internal" and reply["message"].endswith("; while doing y")
    assert isinstance(remote_error(reply), RuntimeError)


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(1, 6))
def test_iotlb_show_pages_give_each_entry_of_both_lists_once_in_order(data, limit):
    """A map next to the same translation cut into more kernel entries: paged from `next` to `next`."""
    asked = data.draw(maps())
    held = MappingTree(sorted(data.draw(pieces_of(asked)), key=lambda m: m.iova))
    pages, start = [], 0
    while start is not None:
        (a, h), start = page_of((asked.tree, held), start, limit)
        assert len(a) <= limit and len(h) <= limit and (a or h or start is None)
        pages.append((a, h))
    assert [m for a, _ in pages for m in a] == list(asked.tree)
    assert [m for _, h in pages for m in h] == list(held)
