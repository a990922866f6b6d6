"""Where events go: journald's native protocol under systemd (a datagram socket stands in), console lines otherwise."""

from __future__ import annotations

import os
import socket
import struct
import sys

import pytest
import structlog

from vdpad import log


def parse_native(datagram: bytes) -> dict[str, str]:
    """journald's side of the native protocol: NAME=value lines, or NAME, newline, le64 length, data."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        newline = rest.index(b"\n")
        equals = rest.find(b"=", 0, newline)
        if equals >= 0:
            fields[rest[:equals].decode()] = rest[equals + 1:newline].decode()
            rest = rest[newline + 1:]
        else:
            (size,) = struct.unpack("<Q", rest[newline + 1:newline + 9])
            data = rest[newline + 9:newline + 9 + size]
            assert rest[newline + 9 + size:newline + 10 + size] == b"\n"
            fields[rest[:newline].decode()] = data.decode()
            rest = rest[newline + 10 + size:]
    return fields


def stderr_is_the_journal_stream(monkeypatch) -> None:
    """What systemd does for a service: $JOURNAL_STREAM names the dev:inode of its stderr.

    Called in the test's body, where stderr is what pytest captures (capfd reads it back).
    """
    stat = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")


@pytest.fixture
def journal(tmp_path, monkeypatch):
    """A datagram socket standing where journald listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "journal"))
        sock.setblocking(False)
        monkeypatch.setattr(log, "JOURNAL_SOCKET", str(tmp_path / "journal"))
        yield sock
    monkeypatch.undo()
    log.configure()  # the other tests' set-up again


def test_events_go_to_the_journal_with_their_keys_as_fields(journal, monkeypatch, capfd):
    stderr_is_the_journal_stream(monkeypatch)
    log.configure("debug")
    structlog.get_logger("vdpad.service").info("iotlb.committed", device="vdpa0", session=3, asid=1,
                                                op="iotlb.commit")
    fields = parse_native(journal.recv(65536))
    assert fields == {"MESSAGE": "iotlb.committed device=vdpa0 session=3 asid=1 op=iotlb.commit",
                      "PRIORITY": "6", "SYSLOG_IDENTIFIER": "vdpad", "EVENT": "iotlb.committed",
                      "DEVICE": "vdpa0", "SESSION": "3", "ASID": "1", "OP": "iotlb.commit"}
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize(("method", "priority"), [("debug", "7"), ("warning", "4"), ("error", "3"), ("critical", "2")])
def test_priority_follows_the_level(journal, monkeypatch, method, priority):
    stderr_is_the_journal_stream(monkeypatch)
    log.configure("debug")
    getattr(structlog.get_logger(), method)("something")
    assert parse_native(journal.recv(65536))["PRIORITY"] == priority


def test_a_value_with_newlines_uses_the_binary_form(journal, monkeypatch):
    stderr_is_the_journal_stream(monkeypatch)
    log.configure()
    structlog.get_logger().warning("client.refused", reason="line one\nline two=2")
    datagram = journal.recv(65536)
    assert b"REASON\n" + struct.pack("<Q", 19) + b"line one\nline two=2\n" in datagram
    assert parse_native(datagram)["REASON"] == "line one\nline two=2"


def test_an_exception_carries_its_traceback(journal, monkeypatch):
    stderr_is_the_journal_stream(monkeypatch)
    log.configure()
    try:
        raise OSError(16, "Device or resource busy")
    except OSError:
        structlog.get_logger().exception("request.failed", op="open")
    fields = parse_native(journal.recv(65536))
    assert fields["PRIORITY"] == "3"
    assert fields["EXCEPTION"].startswith("Traceback (most recent call last):")
    assert fields["EXCEPTION"].rstrip().endswith("OSError: [Errno 16] Device or resource busy")


def test_disabled_levels_send_nothing(journal, monkeypatch):
    stderr_is_the_journal_stream(monkeypatch)
    log.configure("warning")
    structlog.get_logger().debug("device.call", op="get_status")
    with pytest.raises(BlockingIOError):
        journal.recv(65536)


@pytest.mark.parametrize(("key", "name"), [("device", "DEVICE"), ("queue-index", "QUEUE_INDEX"),
                                           ("_source_realtime", "SOURCE_REALTIME"), ("9p", "P"), ("é", "FIELD"),
                                           ("x" * 80, "X" * 64)])
def test_keys_become_journal_field_names(key, name):
    assert log.field_name(key) == name


def test_without_journald_the_event_is_a_console_line(journal, tmp_path, monkeypatch, capfd):
    stderr_is_the_journal_stream(monkeypatch)
    monkeypatch.setattr(log, "JOURNAL_SOCKET", str(tmp_path / "no-journald"))
    log.configure()
    structlog.get_logger().warning("daemon.stopping", signal="SIGTERM")
    line = capfd.readouterr().err
    assert "daemon.stopping" in line and "signal=SIGTERM" in line and line.endswith("\n")


def test_an_event_too_big_for_a_datagram_is_a_console_line(journal, monkeypatch, capfd):
    stderr_is_the_journal_stream(monkeypatch)
    log.configure()
    structlog.get_logger().warning("plan.dump", plan="x" * (4 << 20))
    assert "plan.dump" in capfd.readouterr().err
    with pytest.raises(BlockingIOError):
        journal.recv(65536)


def test_stderr_that_is_not_the_journal_stream_gets_console_lines(journal, monkeypatch, capfd):
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # what a redirected stderr looks like
    log.configure()
    structlog.get_logger().warning("daemon.stopping", signal="SIGTERM")
    assert "daemon.stopping" in capfd.readouterr().err
    with pytest.raises(BlockingIOError):
        journal.recv(65536)


def test_a_level_that_is_none_is_named():
    with pytest.raises(ValueError, match="VDPAD_LOG='loud' is not a log level"):
        log.configure("loud")


def test_a_key_named_like_an_entrys_own_field_does_not_replace_it(journal, monkeypatch):
    stderr_is_the_journal_stream(monkeypatch)
    log.configure()
    structlog.get_logger().warning("systemd.notify_failed", message="READY=1", priority="high")
    fields = parse_native(journal.recv(65536))
    assert fields["MESSAGE"] == "systemd.notify_failed message=READY=1 priority=high"
    assert (fields["PRIORITY"], fields["VDPAD_MESSAGE"], fields["VDPAD_PRIORITY"]) == ("4", "READY=1", "high")
