"""The C miss loop's logic, over a SOCK_SEQPACKET pair standing in for the device's fd (one message per
read and write, as vhost frames them): table lookups against AddressMap's, the UPDATE's framing, the
bookkeeping of what was answered, every reason it hands a message back, and MissServer's use of it (when
its table is reloaded or emptied). tests/kernel/test_device_net.py and test_domains.py run them on
/dev/vhost-net."""

from __future__ import annotations

import os
import queue
import socket
import threading
from array import array
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpad.device.iotlb_io import IotlbChannel
from vdpad.device.iotlb_msg import Access, CodecError, IotlbMessage, MessageType, Version
from vdpad.device.miss_loop import MissEvent, MissLoop
from vdpad.iotlb.space import AddressMap, Mapping
from vdpad.service.misses import MissServer, answer_for

P = 0x1000


class Region:
    name, size, address, closed = "r", 1 << 40, 0x7F00_0000_0000, False


REGION = Region()


@contextmanager
def device(version: Version = Version.V2) -> Iterator[tuple[IotlbChannel, socket.socket, int, int]]:
    """The loop's end as a channel, the test's end of the pair, and a stop pipe."""
    ours, loops = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    loops.setblocking(False)
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
    try:
        ours.settimeout(5)
        yield IotlbChannel(loops.fileno(), version, "socketpair", None), ours, stop_r, stop_w
    finally:
        for end in (ours, loops):
            end.close()
        os.close(stop_r)
        os.close(stop_w)


@contextmanager
def serving(loop: MissLoop, channel: IotlbChannel, stop_r: int, stop_w: int) -> Iterator[queue.Queue]:
    """The loop run in a thread, as a miss service runs it: what it hands back is put on the queue."""
    reports: queue.Queue = queue.Queue()

    def run() -> None:
        while (report := loop.run(channel, stop_r)).event is not MissEvent.STOPPED:
            reports.put(report)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield reports
    finally:
        os.write(stop_w, b"x")
        thread.join()


def miss(iova: int, perm: Access, version: Version = Version.V2) -> bytes:
    return IotlbMessage(MessageType.MISS, iova, 0, 0, perm).encode(version)


def loaded(mappings: list[Mapping], window: int = 16) -> tuple[MissLoop, AddressMap]:
    domain = AddressMap(mappings)
    loop = MissLoop(window)
    quads = domain.tree.update_quads()
    with loop.lock:
        loop.serving = True
        loop.load(quads)
    return loop, domain


def test_the_table_needs_the_lock():
    loop = MissLoop(4)
    for attempt in (lambda: loop.load(b""), loop.take_held, loop.times):
        with pytest.raises(RuntimeError, match="needs the loop's lock held"):
            attempt()
    with loop.lock:
        with loop.lock:  # re-entrant
            loop.load(b"")
        assert loop.take_held() == []
    with pytest.raises(RuntimeError, match="needs the loop's lock"):
        loop.serving = True


@pytest.mark.parametrize("version", [Version.V1, Version.V2])
def test_an_answer_is_the_covering_entry_framed_as_the_fd_acked(version):
    loop, _ = loaded([Mapping(0x10 * P, 4 * P, REGION, 8 * P, Access.RO), Mapping(0x20 * P, P, REGION, 0, Access.RW)])
    with device(version) as (channel, ours, stop_r, stop_w), serving(loop, channel, stop_r, stop_w) as reports:
        ours.send(miss(0x13 * P + 0x123, Access.RO, version))  # the last page of the first entry
        ours.send(miss(0x20 * P, Access.WO, version))
        updates = [IotlbMessage.decode(ours.recv(128)) for _ in range(2)]
    assert reports.empty()
    assert updates == [IotlbMessage(MessageType.UPDATE, 0x10 * P, 4 * P, REGION.address + 8 * P, Access.RO),
                       IotlbMessage(MessageType.UPDATE, 0x20 * P, P, REGION.address, Access.RW)]
    assert loop.served == 2
    with loop.lock:
        assert loop.take_held() == [0, 1]
        assert len(loop.times()) == 2


@settings(max_examples=60, deadline=None)
@given(pages=st.lists(st.tuples(st.integers(1, 3), st.sampled_from([Access.RO, Access.WO, Access.RW])),
                      min_size=0, max_size=12),
       gaps=st.lists(st.integers(0, 2), min_size=12, max_size=12),
       asks=st.lists(st.tuples(st.integers(0, 60 * P), st.sampled_from([Access.RO, Access.WO, Access.RW])),
                     min_size=1, max_size=20))
def test_the_loop_answers_exactly_what_the_map_does(pages, gaps, asks):
    """Whatever the table, a miss is answered when AddressMap.lookup and answer_for say it can be, with that
    entry, and handed back (UNANSWERED) when they say it cannot."""
    mappings, iova = [], 0
    for (size, perm), gap in zip(pages, gaps):
        iova += gap * P
        mappings.append(Mapping(iova, size * P, REGION, iova, perm))  # offsets run on: only perms split them
        iova += size * P
    loop, domain = loaded(mappings)
    with device() as (channel, ours, stop_r, stop_w), serving(loop, channel, stop_r, stop_w) as reports:
        for iova, perm in asks:
            ours.send(miss(iova, perm))
            expected = domain.lookup(iova)
            if answer_for(expected, perm) is None:
                got = IotlbMessage.decode(ours.recv(128))
                assert (got.iova, got.size, got.uaddr, got.perm) == (
                    expected.iova, expected.size, expected.uaddr, expected.perm)
            else:
                back = reports.get(timeout=5)
                assert (back.event, back.iova, back.perm) == (MissEvent.UNANSWERED, iova, perm)
        assert reports.empty()


def test_what_was_answered_is_taken_once_per_load_and_times_keep_the_latest_window():
    loop, domain = loaded([Mapping(0, P, REGION, 0, Access.RO), Mapping(P, P, REGION, 0, Access.RO)], window=4)
    with device() as (channel, ours, stop_r, stop_w):
        for iova in (P, 0, P, P, 0, P):
            ours.send(miss(iova, Access.RO))
        ours.send(miss(9 * P, Access.RO))  # the last one comes back: the loop has answered all before it
        assert loop.run(channel, stop_r).event is MissEvent.UNANSWERED
        assert loop.served == 6
        with loop.lock:
            assert loop.take_held() == [1, 0] and loop.take_held() == []
            assert len(loop.times()) == 4  # the window
            loop.load(domain.tree.update_quads())
        ours.send(miss(P, Access.RO))
        ours.send(miss(9 * P, Access.RO))
        assert loop.run(channel, stop_r).event is MissEvent.UNANSWERED
        with loop.lock:
            assert loop.take_held() == [1]  # a new table: held afresh


def test_a_retired_loop_drops_misses_and_other_messages_come_back():
    loop, _ = loaded([Mapping(0, P, REGION, 0, Access.RW)])
    with device() as (channel, ours, stop_r, stop_w):
        with loop.lock:
            loop.serving = False
        ours.send(miss(0, Access.RO))  # dropped: no answer, nothing handed back
        ours.send(IotlbMessage(MessageType.ACCESS_FAIL, 5 * P, P, 0, Access.RO).encode())
        back = loop.run(channel, stop_r)
        assert (back.event, back.type, back.iova) == (MissEvent.UNEXPECTED, MessageType.ACCESS_FAIL, 5 * P)
        assert loop.served == 0
        ours.setblocking(False)
        with pytest.raises(BlockingIOError):
            ours.recv(128)


def test_a_refused_update_and_a_malformed_message_are_told():
    loop, _ = loaded([Mapping(0, P, REGION, 0, Access.RW)])
    with device(Version.V1) as (channel, ours, stop_r, stop_w):
        ours.send(miss(0, Access.RO, Version.V2))  # the wrong framing for this fd
        with pytest.raises(CodecError, match="version word 2, not a V1 message"):
            loop.run(channel, stop_r)
        ours.send(b"\x01\x00\x00\x00")
        with pytest.raises(CodecError, match="sent 4 bytes"):
            loop.run(channel, stop_r)
        ours.send(miss(0, Access.RO, Version.V1))
        ours.shutdown(socket.SHUT_RD)  # the UPDATE has nowhere to go
        back = loop.run(channel, stop_r)
    assert back.event is MissEvent.REFUSED and back.error == 32  # EPIPE
    assert back.update == (0, P, REGION.address, int(Access.RW)) and loop.served == 0


# -- MissServer on the loop -------------------------------------------------------------------------

class SocketDevice:
    """What MissServer uses of a VhostNet, over the test's pair: its IOTLB messages go to the test's end."""

    path, released = "socketpair", False

    def __init__(self, end: socket.socket):
        self.end = end

    @contextmanager
    def iotlb_channel(self) -> Iterator[IotlbChannel]:
        yield IotlbChannel(self.end.fileno(), Version.V2, self.path, None)

    def write_iotlb(self, message: IotlbMessage) -> None:
        self.end.send(message.encode())

    def write_iotlb_batch(self, batch) -> int:
        for message in batch.messages():
            self.end.send(message.encode())
        return len(batch.messages())


class Domain:
    def __init__(self, amap: AddressMap):
        self.map = amap


def received(ours: socket.socket) -> IotlbMessage:
    return IotlbMessage.decode(ours.recv(128))


def nothing_sent(ours: socket.socket) -> bool:
    ours.settimeout(0.3)
    try:
        ours.recv(128)
    except TimeoutError:
        return True
    finally:
        ours.settimeout(5)
    return False


def test_a_miss_server_reloads_a_changed_map_and_never_answers_from_a_revoked_one():
    a, b, a_again = (Mapping(0x10 * P, P, REGION, 0, Access.RO), Mapping(0x20 * P, P, REGION, P, Access.RW),
                     Mapping(0x10 * P, P, REGION, 7 * P, Access.RO))

    def update(m: Mapping) -> IotlbMessage:
        return IotlbMessage(MessageType.UPDATE, m.iova, m.size, m.uaddr, m.perm)

    ours, loops = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    loops.setblocking(False)
    ours.settimeout(5)
    domain = Domain(AddressMap([a]))
    server = MissServer(SocketDevice(loops), domain, label="test")
    server.start()
    try:
        ours.send(miss(a.iova, Access.RO))
        assert received(ours) == update(a)  # from the table loaded at start
        domain.map = domain.map.mapped(b)  # a commit that only adds: the table is left as it was...
        ours.send(miss(b.iova + 5, Access.WO))
        assert received(ours) == update(b)  # ...so the miss came back, and the changed map was loaded
        assert server.counters.served == 2 and not server.pending
        assert len(server.mappings_of(REGION)) == 2  # both answers are held
        domain.map = domain.map.unmapped(a.iova, a.size)  # a commit that revokes: the map first, then
        server.invalidate([(a.iova, a.size)])
        assert received(ours) == IotlbMessage(MessageType.INVALIDATE, a.iova, a.size)
        assert server.mappings_of(REGION) == [f"[{b.iova:#x}, {b.end:#x}) held by socketpair (test)"]
        ours.send(miss(a.iova, Access.RO))
        assert nothing_sent(ours)  # no answer from the table a was in
        assert server.counters.unmapped == 1 and list(server.pending) == [(a.iova, int(Access.RO))]
        domain.map = domain.map.mapped(a_again)
        assert server.retry_pending() == 1
        assert received(ours) == update(a_again) and server.counters.late == 1
        server.forget_all()
        assert server.mappings_of(REGION) == [] and server.describe()["held_count"] == 0
        ours.send(miss(b.iova, Access.RO))
        assert received(ours) == update(b)
        assert server.describe()["held"] == [[b.iova, b.size]]
        assert server.describe()["service_us"]["count"] == 3
    finally:
        server.retire(invalidate=False)
        ours.close()
        loops.close()
    assert not server.running
