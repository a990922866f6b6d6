"""IOTLB batches: packed as the codec frames each message, checked in bulk as each message is, refusals counted."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from tests.sim import debug_logging
from vdpad.device import (
    Access, BackendFeature, CodecError, InvalidArgument, IotlbBatch, IotlbMessage, IotlbWriteError, MessageType,
    VhostNet, Version,
)
from vdpad.device.iotlb_msg import outside_window

U64 = (1 << 64) - 1
u64 = st.integers(0, U64)
ranges = st.lists(st.tuples(u64, u64), max_size=8)
updates = st.lists(st.tuples(u64, u64, u64, st.sampled_from(Access)), max_size=8)
batches = st.builds(IotlbBatch, st.integers(0, 0xFFFFFFFF), ranges, updates, st.booleans(), st.booleans())


@given(batches, st.sampled_from(Version))
def test_a_packed_batch_is_its_messages_encoded_back_to_back(batch, version):
    messages = batch.messages()
    if version is Version.V1 and batch.asid:
        with pytest.raises(CodecError, match="needs a v2 message"):
            batch.pack(version)
        return
    data = batch.pack(version)
    assert data == b"".join(message.encode(version) for message in messages)
    chunks = [data[at:at + version.size] for at in range(0, len(data), version.size)]
    assert [IotlbMessage.decode(chunk) for chunk in chunks] == messages
    assert len(batch) == len(messages) and IotlbBatch.of(messages).messages() == messages


@given(batches, st.one_of(st.just((0, U64)), st.tuples(u64, u64)))
def test_the_bulk_check_finds_what_each_message_would(batch, window):
    first = next(((index, problem) for index, message in enumerate(batch.messages())
                  if (problem := message.problem_for_write() or outside_window(message, window))), None)
    assert batch.problem_for_write(window) == first


def test_a_value_that_fits_no_field_is_named():
    with pytest.raises(CodecError, match="size=.* does not fit in 64 bits"):
        IotlbBatch(0, [], [(0, 1 << 64, 0, Access.RW)]).problem_for_write()
    for asid in (-1, 1 << 32):
        with pytest.raises(CodecError, match="asid=.* does not fit in 32 bits"):
            IotlbBatch(asid, [(0, 0x1000)]).problem_for_write()
    with pytest.raises(CodecError, match="perm=300"):
        IotlbBatch(0, [], [(0, 0x1000, 0, 300)]).pack()
    with pytest.raises(CodecError, match="each UPDATE \\(iova, size, uaddr, perm\\)"):
        IotlbBatch(0, [], [(0, 0x1000, 0)]).problem_for_write()


def test_of_refuses_what_is_not_a_batch():
    with pytest.raises(CodecError, match="BATCH_BEGIN\\?, INVALIDATEs, UPDATEs"):
        IotlbBatch.of([IotlbMessage(MessageType.UPDATE, 0, 1, 0, Access.RO),
                       IotlbMessage(MessageType.INVALIDATE, 0, 1)])


def acked(dev: VhostNet, features: BackendFeature) -> None:
    dev._backend_features = features  # what set_backend_features books; a pipe has no ioctls to ask


@pytest.fixture
def pipe_device():
    """A device whose fd is a non-blocking pipe one page deep: it takes 4096 // 72 = 56 v2 messages, then EAGAIN."""
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
        with VhostNet(f"/proc/self/fd/{write_end}") as dev:
            fcntl.fcntl(dev.fileno(), fcntl.F_SETFL, os.O_NONBLOCK)
            acked(dev, BackendFeature.IOTLB_MSG_V2 | BackendFeature.IOTLB_BATCH)
            yield dev, read_end
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_refusal_half_way_reports_how_many_were_taken(pipe_device):
    dev, read_end = pipe_device
    batch = IotlbBatch(0, [(0x1000 * i, 0x1000) for i in range(100)], begin=True, end=True)
    with pytest.raises(IotlbWriteError) as refused:
        dev.write_iotlb_batch(batch)
    assert refused.value.errno == errno.EAGAIN and refused.value.accepted == 56
    assert "IOTLB INVALIDATE" in str(refused.value) and f"iova={0x1000 * 55:#x}" in str(refused.value)
    data = os.read(read_end, 8192)
    assert data == batch.pack()[:56 * Version.V2.size]  # exactly the messages it counted, whole


def test_a_batch_is_written_whole_and_every_message_is_a_debug_event(pipe_device):
    dev, read_end = pipe_device
    batch = IotlbBatch(0, [(0x1000, 0x1000)], [(0x2000, 0x1000, 0x9000, Access.RW)], begin=True, end=True)
    with debug_logging(), structlog.testing.capture_logs() as events:
        with VhostNet(dev.path) as logged:
            acked(logged, dev.acked_backend_features)
            assert logged.write_iotlb_batch(batch) == 4
    assert [(e["event"], e["type"]) for e in events if e["event"] == "iotlb.write"] == [
        ("iotlb.write", "BATCH_BEGIN"), ("iotlb.write", "INVALIDATE"), ("iotlb.write", "UPDATE"),
        ("iotlb.write", "BATCH_END")]
    assert os.read(read_end, 8192) == batch.pack()


def test_the_checks_come_before_anything_is_written(pipe_device):
    dev, read_end = pipe_device
    good = [(0x1000, 0x1000, 0x9000, Access.RW)]
    refused = [
        (IotlbBatch(0, [(0x1000, 0x1000)], [(0x2000, 0, 0x9000, Access.RW)]), "message 1: UPDATE with size 0"),
        (IotlbBatch(0, [], good + [(0x2000, 0x1000, 0x9000, Access.NONE)]), "message 1: UPDATE needs perm"),
        (IotlbBatch(1, [], good), "asid=1 needs IOTLB_ASID acked first"),
    ]
    for batch, problem in refused:
        with pytest.raises(InvalidArgument, match=problem):
            dev.write_iotlb_batch(batch)
    acked(dev, BackendFeature.IOTLB_MSG_V2)
    with pytest.raises(InvalidArgument, match="BATCH_END needs IOTLB_BATCH acked first"):
        dev.write_iotlb_batch(IotlbBatch(0, [], good, end=True))
    fcntl.fcntl(read_end, fcntl.F_SETFL, os.O_NONBLOCK)
    with pytest.raises(BlockingIOError):
        os.read(read_end, 8192)  # nothing was written
