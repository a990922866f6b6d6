"""The split ring's driver half against a stand-in device written from the spec (virtio 1.x, 2.7)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpad.iotlb.memory import MemoryRegion
from vdpad.virtio import Buffer, DmaArena, DriverError, RingFull, RingLayout, SplitRing, negotiate
from vdpad.virtio.driver import REQUIRED_FEATURES


class SpecDevice:
    """The device half, reading the ring the way section 2.7 describes it (independent struct formats)."""

    def __init__(self, memory: memoryview, num: int, base: int):
        self.mem, self.num = memory, num
        self.desc = 0
        self.avail = 16 * num
        self.used = (self.avail + 6 + 2 * num + 3) // 4 * 4
        self.last_avail = base
        self.used_idx = base

    def u16(self, offset: int) -> int:
        return struct.unpack_from("<H", self.mem, offset)[0]

    def take(self) -> list[tuple[int, list[tuple[int, int, bool]]]]:
        """Every chain made available since the last call: (head, [(addr, len, writable)])."""
        chains = []
        while self.last_avail != self.u16(self.avail + 2):
            head = self.u16(self.avail + 4 + 2 * (self.last_avail % self.num))
            chain, index = [], head
            for _ in range(self.num):  # a chain longer than the table is a loop
                addr, length, flags, nxt = struct.unpack_from("<QIHH", self.mem, self.desc + 16 * index)
                chain.append((addr, length, bool(flags & 2)))
                if not flags & 1:
                    break
                index = nxt
            else:
                raise AssertionError("descriptor chain loops")
            chains.append((head, chain))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chains

    def complete(self, head: int, written: int) -> None:
        struct.pack_into("<II", self.mem, self.used + 4 + 8 * (self.used_idx % self.num), head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, self.used + 2, self.used_idx)


def make_ring(num: int, base: int = 0) -> tuple[SplitRing, SpecDevice]:
    memory = memoryview(bytearray(RingLayout(num).size))
    return SplitRing(memory, num, base=base), SpecDevice(memory, num, base)


@pytest.mark.parametrize("num", [1, 2, 64, 256, 32768])
def test_layout_follows_the_spec(num):
    layout = RingLayout(num)
    assert layout.desc == 0
    assert layout.avail == 16 * num  # right after the 16-byte descriptors
    assert layout.used % 4 == 0 and layout.avail + 4 + 2 * num + 2 <= layout.used < layout.avail + 6 + 2 * num + 4
    assert layout.size == layout.used + 4 + 8 * num + 2


@pytest.mark.parametrize("num", [0, 3, 100, 65536])
def test_layout_refuses_sizes_that_are_not_powers_of_two(num):
    with pytest.raises(ValueError, match="power of two"):
        RingLayout(num)


def test_chain_as_the_device_sees_it():
    ring, device = make_ring(8)
    head = ring.add([Buffer(0x1000, 12), Buffer(0x2000, 100), Buffer(0x3000, 2048, writable=True)], "t")
    ((seen_head, chain),) = device.take()
    assert seen_head == head
    assert chain == [(0x1000, 12, False), (0x2000, 100, False), (0x3000, 2048, True)]
    assert ring.free == 5 and ring.in_flight == 1
    device.complete(head, 77)
    ((used),) = ring.reap()
    assert (used.head, used.written, used.token) == (head, 77, "t")
    assert ring.free == 8 and ring.in_flight == 0 and ring.reap() == []


def test_refused_chains_change_nothing():
    ring, device = make_ring(4)
    for bad, message in (([], "at least one"), ([Buffer(0, 8, True), Buffer(8, 8)], "before writable"),
                         ([Buffer(0, 0)], "length"), ([Buffer(2**64 - 4, 8)], "64 bits")):
        with pytest.raises(ValueError, match=message):
            ring.add(bad)
    with pytest.raises(RingFull):
        ring.add([Buffer(i * 16, 16) for i in range(5)])
    assert ring.free == 4 and ring.avail_idx == 0 and device.take() == []


def test_interrupt_suppression_flag():
    memory = memoryview(bytearray(RingLayout(4).size))
    SplitRing(memory, 4, interrupts=False)
    assert struct.unpack_from("<H", memory, RingLayout(4).avail)[0] == 1


def test_a_foreign_used_id_is_an_error():
    ring, device = make_ring(4)
    ring.add([Buffer(0, 8)])
    device.take()
    device.complete(3, 0)
    with pytest.raises(RuntimeError, match="not an in-flight head"):
        ring.reap()


@settings(max_examples=200, deadline=None)
@given(num=st.sampled_from([1, 2, 4, 8, 16]), base=st.integers(0, 0xFFFF),
       ops=st.lists(st.tuples(st.booleans(), st.integers(1, 4)), max_size=80))
def test_any_interleaving_returns_every_token_once(num, base, ops):
    """Adds and out-of-order completions across the 16-bit wrap: nothing lost, nothing leaked."""
    ring, device = make_ring(num, base)
    queued: dict[int, tuple[object, list]] = {}
    pending: list[int] = []
    returned: list[object] = []
    sent: list[object] = []
    for step, (add, length) in enumerate(ops):
        if add:
            chain = [Buffer(0x10000 * step + i, 8 * (i + 1), writable=i == length - 1) for i in range(length)]
            if length > ring.free:
                with pytest.raises(RingFull):
                    ring.add(chain, step)
                continue
            head = ring.add(chain, step)
            sent.append(step)
            queued[head] = (step, [(b.iova, b.length, b.writable) for b in chain])
            for seen_head, seen_chain in device.take():
                assert queued[seen_head][1] == seen_chain
                pending.append(seen_head)
        elif pending:
            # Complete the newest first: used order need not follow avail order.
            head = pending.pop()
            device.complete(head, length)
            (used,) = ring.reap()
            assert used.token == queued.pop(head)[0] and used.written == length
            returned.append(used.token)
    for head in reversed(pending):
        device.complete(head, 0)
    returned += [used.token for used in ring.reap()]
    assert sorted(returned) == sorted(sent)
    assert ring.free == num and ring.in_flight == 0
    assert ring.avail_idx == (base + len(sent)) & 0xFFFF == ring.used_idx


def test_negotiate():
    offered = 0x308830028  # vdpa_sim net
    assert negotiate(offered, 1 << 5) == (1 << 5) | REQUIRED_FEATURES
    assert negotiate(offered, 1 << 0) == REQUIRED_FEATURES  # CSUM not offered: dropped
    with pytest.raises(DriverError, match="required features 0x200000000"):
        negotiate(offered & ~(1 << 33), 0)


def test_arena_hands_out_aligned_windows_of_the_region():
    with MemoryRegion(4 * 4096, "arena") as region, \
            DmaArena(region, 0x40000000, offset=4096, size=2 * 4096) as arena:
        first = arena.alloc(10)
        ring = arena.alloc(100, 4096)
        assert (first.iova, ring.iova) == (0x40000000, 0x40001000)
        ring.view[:4] = b"ring"
        assert bytes(region.view[2 * 4096: 2 * 4096 + 4]) == b"ring"  # iova - arena.iova + offset
        with pytest.raises(MemoryError, match="left"):
            arena.alloc(4096)
        arena.reset()
        with pytest.raises(ValueError, match="released"):
            ring.view[0]  # reset takes allocations back
        assert arena.alloc(8).iova == 0x40000000
        with pytest.raises(ValueError, match="not inside"):
            DmaArena(region, 0, offset=4096, size=4 * 4096)
        with pytest.raises(ValueError, match="power of two"):
            arena.alloc(8, 3)
