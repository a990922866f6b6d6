"""The daemon process on the host (no vdpa here): it survives whatever a client sends, and answers
every request with a reply that names what was wrong. tests/kernel/test_service_*.py drive devices."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.privilege import run_cli
from tests.service import VDPAD, running_daemon
from vdpad.client import Client, DaemonUnavailable
from vdpad.service import wire
from vdpad.service.protocol import VERSION, ProtocolError
from vdpad.service.server import OPS


@pytest.fixture(scope="module")
def daemon():
    with running_daemon() as running:
        yield running


def exchange(daemon, data: bytes, fds=()) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(str(daemon.socket))
        sock.sendmsg([data], wire.ancillary(fds))
        got = wire.receive(sock)
        assert got is not None, "the daemon closed the connection instead of answering"
        reply, passed = got
        passed.close()
        return reply


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
arg_names = st.sampled_from(["session", "device", "name", "fd", "size", "offset", "iova", "asid", "ops", "index",
                             "num", "status", "features", "enabled", "persist", "group", "mgmtdev", "data"])
requests = st.fixed_dictionaries({
    "v": st.sampled_from([VERSION, VERSION, 0, 2, "1", None]),
    "id": json_values,
    "op": st.sampled_from(sorted(OPS)) | st.text(max_size=12),
    "args": st.dictionaries(arg_names, json_values, max_size=5) | json_values,
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests, fds=st.integers(min_value=0, max_value=3))
def test_any_request_gets_a_reply_and_the_daemon_goes_on(daemon, request, fds):
    with open("/dev/null") as null:
        reply = exchange(daemon, json.dumps(request).encode(), [null.fileno()] * fds)
    assert reply["v"] == VERSION and isinstance(reply["ok"], bool)
    if not reply["ok"]:
        assert reply["error"]["kind"] != "internal", reply["error"]["message"]
        assert reply["error"]["message"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=512))
def test_any_bytes_get_a_protocol_error(daemon, data):
    reply = exchange(daemon, data)
    if not reply["ok"]:
        assert reply["error"]["kind"] in ("protocol", "not_supported", "not_found"), reply


def test_the_daemon_still_serves_after_all_that_and_holds_no_stray_fd(daemon):
    fds = daemon.settled_fds()
    with daemon.client() as client:
        assert client.hello()["version"] == VERSION
        status = client.status()
    assert status["counters"]["requests"] > 0 and status["sessions"] == 0
    assert daemon.settled_fds(fds) == fds


def test_a_request_of_another_version_names_the_served_one(daemon):
    reply = exchange(daemon, json.dumps({"v": 2, "id": 5, "op": "hello"}).encode())
    assert reply["id"] == 5 and reply["error"]["kind"] == "protocol"
    assert "version 2 is not served; this daemon speaks 1" in reply["error"]["message"]


def test_an_unknown_argument_is_named(daemon):
    with daemon.client() as client, pytest.raises(ProtocolError, match="unknown argument.*'colour'"):
        client.request("hello", colour="blue")


def test_no_daemon_is_a_clear_error(tmp_path):
    with pytest.raises(DaemonUnavailable, match=f"no vdpad daemon answers on {tmp_path}/none"):
        Client(tmp_path / "none")


def test_a_second_daemon_on_the_same_socket_is_refused(daemon):
    with running_daemon() as other:  # its own socket works
        assert other.client().hello()
    proc = subprocess.run([VDPAD, "serve", "--socket", str(daemon.socket)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7 and "another daemon already answers" in proc.stderr


def test_a_client_that_is_not_root_nor_in_the_group_is_refused(daemon):
    refused = run_cli(["status", "--socket", str(daemon.socket)])
    assert refused.returncode == 5, refused
    assert "pid" in refused.stderr and "(uid 65534) may not use vdpad: root only" in refused.stderr
