"""The daemon in the VM: a client drives vdpasim_net through a session, and nothing a client does or
suffers (bad requests, another client's session, dying) stops the daemon serving the others."""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import trio

from tests.privilege import run_cli
from tests.service import running_daemon
from tests.sim import frames, iova_far_from_us, sim_mode, vdpa_device
from vdpad.client import AsyncClient, AsyncSession, RemoteError, RemoteSession
from vdpad.device import EventFd, InvalidArgument, NotSupportedError, VhostVdpa
from vdpad.iotlb import PAGE_SIZE, MemoryRegion, Perm, RegionInUse
from vdpad.service import wire
from vdpad.service.protocol import VERSION, ProtocolError, Unauthorized
from vdpad.virtio import BlkDriver, DmaArena, DriverError, NetDriver
from vdpad.virtio.net import RX, TX

pytestmark = pytest.mark.kernel

REGION_SIZE = 1 << 20
FRAMES = 16


@pytest.fixture(scope="module")
def daemon(sim_modules):
    with running_daemon() as running:
        yield running


@pytest.fixture
def client(daemon):
    with daemon.client() as connected:
        yield connected


def start_net(session, region: MemoryRegion) -> tuple[NetDriver, DmaArena, int]:
    iova = iova_far_from_us(session.iova_range, region.size)
    session.commit([session.map(iova, region, 0, region.size)])
    arena = DmaArena(region, iova)
    net = NetDriver(session.device, arena)
    net.start()
    return net, arena, iova


def test_frames_through_a_session_across_a_persistent_reset(daemon, client, vdpa_net):
    with MemoryRegion(REGION_SIZE, "ram") as ram:
        session = client.open_session(vdpa_net.name)
        assert session.info["persistent"] and session.info["device_id"] == 1
        session.register(ram)
        net, arena, iova = start_net(session, ram)
        with net, arena:
            sent = frames(FRAMES, seed=11)
            assert net.exchange(sent) == sent
            assert session.reset() == {"persistent": True}
            net.start()
            again = frames(FRAMES, seed=12)
            assert net.exchange(again) == again
        shown = client.iotlb_show(vdpa_net.name, asid=0)
        (space,) = shown["spaces"]
        assert space["in_sync"] and space["map"] == [
            {"iova": iova, "size": REGION_SIZE, "memory": "ram", "offset": 0, "perm": "rw"}]
        listed = {s["session"]: s for s in client.sessions()}
        assert listed[session.number]["owner"]["pid"] == os.getpid()
        assert listed[session.number]["mapped"] == REGION_SIZE
        assert sorted(listed[session.number]["eventfds"]) == ["call 0", "call 1", "kick 0", "kick 1"]
        session.close()
        assert session.number not in {s["session"] for s in client.sessions()}
    # The daemon let go of the node: it can be opened here now.
    with VhostVdpa(vdpa_net.node):
        pass


def test_memory_the_daemon_allocates_carries_frames(client, vdpa_net):
    session = client.open_session(vdpa_net.node.as_posix())  # by node as well as by name
    ram = session.allocate("daemon-ram", REGION_SIZE)
    try:
        net, arena, _ = start_net(session, ram)
        with net, arena:
            sent = frames(FRAMES, seed=13)
            assert net.exchange(sent) == sent
    finally:
        session.close()
        ram.close()


def test_a_device_without_the_operation_answers_not_supported_over_the_session(client, vdpa_net):
    session = client.open_session(vdpa_net.name)
    try:
        # vdpa_sim's default batch_mapping=1 has no per-queue ring size: the driver's fallback path
        with pytest.raises(NotSupportedError) as raised:
            session.device.get_vring_size(0)
        assert isinstance(raised.value, RemoteError) and raised.value.errno == 95
        assert session.device.get_vring_num() == 256
    finally:
        session.close()


def test_another_client_cannot_touch_a_session(daemon, client, vdpa_net):
    session = client.open_session(vdpa_net.name)
    try:
        with daemon.client() as other:
            for op, args in [("session.reset", {}), ("session.close", {}), ("device.get_status", {}),
                             ("iotlb.commit", {"ops": [{"op": "unmap", "iova": 0, "size": PAGE_SIZE}]}),
                             ("memory.alloc", {"name": "theirs", "size": PAGE_SIZE}),
                             ("group.set_asid", {"group": 0, "asid": 0})]:
                with pytest.raises(Unauthorized, match=f"session {session.number} belongs to another client"):
                    other.call(op, {"session": session.number, **args})
            with pytest.raises(RemoteError, match="in use by session"):
                other.open_session(vdpa_net.name)
            assert other.sessions()[0]["session"] == session.number  # visible, not usable
        session.reset()
    finally:
        session.close()


def _raw(daemon, message: bytes, fds=()) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(str(daemon.socket))
        sock.sendmsg([message], wire.ancillary(fds))
        reply, passed = wire.receive(sock)
        passed.close()
        return reply


@pytest.mark.parametrize("message, kind, words", [
    (b"{not json", "protocol", "not JSON"),
    (b"[1, 2]", "protocol", "not an object"),
    (json.dumps({"v": 99, "id": 1, "op": "hello"}).encode(), "protocol", "version 99"),
    (json.dumps({"v": VERSION, "id": 1, "op": "no.such"}).encode(), "protocol", "unknown op 'no.such'"),
    (json.dumps({"v": VERSION, "id": 1, "op": "session.open", "args": {"device": 7}}).encode(), "protocol",
     "argument 'device' must be a string"),
    (json.dumps({"v": VERSION, "id": 1, "op": "hello", "args": {"x": 1}}).encode(), "protocol", "unknown argument"),
    (json.dumps({"v": VERSION, "id": 1, "op": "session.close", "args": {"session": 999}}).encode(), "not_found",
     "no session 999"),
])
def test_bad_requests_get_an_error_naming_what_was_wrong(daemon, message, kind, words):
    reply = _raw(daemon, message)
    assert reply["ok"] is False and reply["error"]["kind"] == kind and words in reply["error"]["message"]


def test_passed_fds_are_closed_whatever_the_request(daemon):
    before = daemon.fds()
    with MemoryRegion(PAGE_SIZE, "stray") as stray:
        for _ in range(5):
            reply = _raw(daemon, json.dumps({"v": VERSION, "id": 1, "op": "hello"}).encode(), [stray.fd] * 3)
            assert reply["ok"]
        reply = _raw(daemon, b"{not json", [stray.fd] * 16)
        assert reply["error"]["kind"] == "protocol"
    assert daemon.settled_fds(before) == before


def test_bad_session_input_changes_nothing(client, vdpa_net):
    with MemoryRegion(REGION_SIZE, "ram") as ram, MemoryRegion(PAGE_SIZE, "tiny") as tiny:
        session = client.open_session(vdpa_net.name)
        try:
            session.register(ram)
            iova = iova_far_from_us(session.iova_range, REGION_SIZE)
            session.commit([session.map(iova, ram, 0, REGION_SIZE, Perm.RO)])
            before = client.iotlb_show(vdpa_net.name)
            with pytest.raises(InvalidArgument, match="no memory 'tiny'"):
                session.commit([session.unmap(iova, PAGE_SIZE), session.map(iova, tiny, 0, PAGE_SIZE)])
            with pytest.raises(InvalidArgument, match="overlap"):
                session.commit([session.map(iova + PAGE_SIZE, ram, 0, PAGE_SIZE)])
            with pytest.raises(ProtocolError, match="perm 'rx'"):
                session.commit([{**session.map(iova, ram, 0, PAGE_SIZE), "perm": "rx"}])
            with pytest.raises(InvalidArgument, match="memory 'ram' already"):
                session.register(ram)
            with pytest.raises(RemoteError, match="not an eventfd"):
                session.device.set_vring_kick(0, ram.fd)
            with pytest.raises(RemoteError, match="still mapped"):
                session.release("ram")
            assert client.iotlb_show(vdpa_net.name) == before
        finally:
            session.close()


CHILD = textwrap.dedent("""
    import os, sys, time
    from vdpad.client import Client
    from vdpad.iotlb import MemoryRegion
    client = Client(sys.argv[1])
    ram = MemoryRegion(int(sys.argv[3]), "child")
    session = client.open_session(sys.argv[2])
    session.register(ram)
    first = session.info["iova_range"]["first"]
    session.commit([session.map(max(first, 1 << 30), ram, 0, ram.size)])
    print(session.number, flush=True)
    time.sleep(600)
""")


def test_a_killed_client_leaves_nothing_behind(sim_modules):
    """PA mode: the daemon pins what the client maps; a SIGKILL of the client unpins it all."""
    with sim_mode(use_va=False), running_daemon() as daemon:
        name = f"kill{os.getpid() % 1000}"
        with vdpa_device(name, "vdpasim_net") as node:
            pinned_before = daemon.status("VmPin")
            fds_before = daemon.fds()
            child = subprocess.Popen([sys.executable, "-c", CHILD, str(daemon.socket), name, str(4 << 20)],
                                     stdout=subprocess.PIPE, text=True)
            try:
                number = int(child.stdout.readline())
                assert daemon.status("VmPin") - pinned_before == 4 << 20
                with daemon.client() as watcher:
                    assert number in {s["session"] for s in watcher.sessions()}
                    child.send_signal(signal.SIGKILL)
                    child.wait()
                    deadline = time.monotonic() + 10
                    while watcher.sessions() and time.monotonic() < deadline:
                        time.sleep(0.05)
                    assert watcher.sessions() == []
                    assert watcher.status()["counters"]["bytes_pinned"] == pinned_before
            finally:
                child.kill()
                child.wait()
                child.stdout.close()
            assert daemon.status("VmPin") == pinned_before
            assert daemon.settled_fds(fds_before) == fds_before
            with VhostVdpa(node):  # released
                pass


def test_memlock_budget_refused_with_the_numbers(sim_modules):
    limit = 2 << 20
    with sim_mode(use_va=False), running_daemon(memlock=limit) as daemon:
        name = f"lim{os.getpid() % 1000}"
        with vdpa_device(name, "vdpasim_net"), MemoryRegion(4 << 20, "big") as big, daemon.client() as client:
            session = client.open_session(name)
            session.register(big)
            iova = iova_far_from_us(session.iova_range, big.size)
            session.commit([session.map(iova, big, 0, 1 << 20)])
            with pytest.raises(InvalidArgument, match=r"RLIMIT_MEMLOCK is 0x200000") as refused:
                session.commit([session.map(iova + (1 << 20), big, 1 << 20, 2 << 20)])
            assert "0x100000 pinned" in str(refused.value)
            assert client.iotlb_show(name)["spaces"][0]["map"][0]["size"] == 1 << 20
            assert daemon.status("VmPin") == 1 << 20
            session.close()


def test_two_sessions_cannot_both_take_the_last_of_the_memlock_budget(sim_modules):
    """Each commit fits alone, not both: one lands, the other is refused by the daemon with the numbers (never
    the kernel's bare EFAULT), however their lanes interleave."""
    limit, each = 64 << 20, 48 << 20
    with sim_mode(use_va=False), running_daemon(memlock=limit) as daemon, \
            vdpa_device("race0", "vdpasim_net"), vdpa_device("race1", "vdpasim_net"), \
            MemoryRegion(each, "ram") as ram:
        clients = [daemon.client() for _ in range(2)]
        sessions = [c.open_session(f"race{n}") for n, c in enumerate(clients)]
        for session in sessions:
            session.register(ram)
        start = threading.Barrier(2)
        outcomes: list = [None, None]

        def commit(n: int) -> None:
            session = sessions[n]
            start.wait()
            try:
                outcomes[n] = session.commit([session.map(iova_far_from_us(session.iova_range, each), ram, 0, each)])
            except RemoteError as error:
                outcomes[n] = error

        threads = [threading.Thread(target=commit, args=(n,)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        refused = [o for o in outcomes if isinstance(o, RemoteError)]
        assert len(refused) == 1, outcomes
        assert isinstance(refused[0], InvalidArgument) and "RLIMIT_MEMLOCK is 0x4000000" in str(refused[0])
        assert daemon.status("VmPin") == each
        for client in clients:
            client.close()


def test_a_silent_client_and_a_deaf_client_slow_no_one(daemon, client):
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        silent.connect(str(daemon.socket))
        deaf.connect(str(daemon.socket))
        deaf.setblocking(False)
        hello = wire.encode({"v": VERSION, "id": 1, "op": "status"})
        sent = 0
        try:
            for _ in range(2000):  # never read: the daemon's replies fill its send buffer
                deaf.send(hello)
                sent += 1
        except BlockingIOError:
            pass
        started = time.monotonic()
        for _ in range(20):
            assert client.hello()["version"] == VERSION
        assert time.monotonic() - started < 5
        assert sent > 0
    finally:
        silent.close()
        deaf.close()


def test_sigterm_closes_every_session_and_exits_zero(sim_modules, vdpa_net):
    with running_daemon() as daemon, MemoryRegion(REGION_SIZE, "ram") as ram:
        client = daemon.client()
        session = client.open_session(vdpa_net.name)
        session.register(ram)
        net, arena, _ = start_net(session, ram)
        with net, arena:
            sent = frames(4, seed=14)
            assert net.exchange(sent) == sent
            started = time.monotonic()
            assert daemon.stop() == 0
            assert time.monotonic() - started < 5
        client.close()
        assert "session.closed" in daemon.log_text()
        with VhostVdpa(vdpa_net.node):
            pass


def test_sigterm_lets_a_commit_in_flight_finish_and_answer(sim_modules):
    """PA mode: a 256 MiB map pins pages for a while; SIGTERM meanwhile, and the client still gets its plan."""
    size = 256 << 20
    with sim_mode(use_va=False), vdpa_device("sigpa0", "vdpasim_net") as node, running_daemon() as daemon, \
            MemoryRegion(size, "ram") as ram:
        client = daemon.client()
        session = client.open_session("sigpa0")
        session.register(ram)
        iova = iova_far_from_us(session.iova_range, size)
        outcome: list = []
        committing = threading.Thread(target=lambda: outcome.append(session.commit([session.map(iova, ram, 0, size)])))
        committing.start()
        while (pinned := daemon.status("VmPin")) == 0 and committing.is_alive():
            time.sleep(0.001)
        daemon.process.send_signal(signal.SIGTERM)
        committing.join(30)
        assert 0 < pinned < size, f"{pinned:#x} pinned: the commit was not pinning when SIGTERM came"
        assert outcome and outcome[0]["update"][0]["size"] == size  # answered, with what was sent
        assert daemon.process.wait(10) == 0
        client.close()
        assert "session.closed" in daemon.log_text()
        with VhostVdpa(node):  # released
            pass


def test_a_trio_client_drives_a_session(daemon, vdpa_net):
    async def main() -> None:
        async with await AsyncClient.connect(daemon.socket) as client:
            session = await client.open_session(vdpa_net.name)
            assert isinstance(session, AsyncSession)
            ram = await session.allocate("trio-ram", REGION_SIZE)
            iova = iova_far_from_us(session.iova_range, REGION_SIZE)
            async with trio.open_nursery() as nursery:  # the loop stays free while the calls run
                nursery.start_soon(session.commit, [RemoteSession.map(iova, ram, 0, REGION_SIZE)])
                nursery.start_soon(client.status)
            (space,) = (await client.iotlb_show(vdpa_net.name, 0))["spaces"]
            assert space["map"][0]["memory"] == "trio-ram" and space["in_sync"]
            assert (await session.reset())["persistent"]
            await session.close()
            ram.close()

    trio.run(main)


@pytest.fixture
def bystander(daemon, sim_device):
    """Another client's session moving frames: checked before and after each bad input."""
    device = sim_device("vdpasim_net")
    with daemon.client() as other, MemoryRegion(REGION_SIZE, "bystander") as ram:
        session = other.open_session(device.name)
        session.register(ram)
        net, arena, _ = start_net(session, ram)
        with net, arena:
            def still_served() -> None:
                sent = frames(4, seed=31)
                assert net.exchange(sent) == sent
            still_served()
            yield still_served
        session.close()


def unsealed_memfd() -> int:
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.ftruncate(fd, PAGE_SIZE)
    return fd


BAD_SESSION_REQUESTS = {
    # name: (op, args, fd maker or None, error kind, words)
    "negative size": ("iotlb.commit", {"ops": [{"op": "unmap", "iova": 0, "size": -4096}]}, None, "protocol",
                      "'size' must be an unsigned 64-bit integer, not -4096"),
    "size of 2^64": ("iotlb.commit", {"ops": [{"op": "map", "iova": 0, "size": 1 << 64, "memory": "ram"}]}, None,
                     "protocol", "'size' must be an unsigned 64-bit integer"),
    "a string for a number": ("device.set_vring_num", {"index": "0", "num": 64}, None, "protocol", "'index'"),
    "a missing fd": ("memory.register", {"name": "m", "fd": 0, "size": PAGE_SIZE}, None, "protocol",
                     "fd 0 was named but the message passed 0 fd(s)"),
    "a pipe for memory": ("memory.register", {"name": "m", "fd": 0, "size": PAGE_SIZE}, "pipe", "invalid", "is not a regular file"),
    "an unsealed memfd": ("memory.register", {"name": "m", "fd": 0, "size": PAGE_SIZE}, "unsealed", "invalid",
                          "is not sealed against shrinking"),
    "a pipe for a kick": ("device.set_vring_kick", {"index": 0, "fd": 0}, "pipe", "invalid", "is not an eventfd"),
    "unregistered memory": ("iotlb.commit", {"ops": [{"op": "map", "iova": 1 << 30, "size": PAGE_SIZE,
                                                      "memory": "nope"}]}, None, "invalid", "no memory 'nope'"),
    "an unknown op in a commit": ("iotlb.commit", {"ops": [{"op": "swap", "iova": 0, "size": PAGE_SIZE}]}, None,
                                  "protocol", "op 'swap' is not map or unmap"),
    "a queue the device lacks": ("device.set_vring_num", {"index": 9, "num": 64}, None, "invalid", "index"),
}


def state(client, device: str) -> tuple:
    """What a refused request must leave as it was: the device's IOTLB, every session (its error count aside)."""
    sessions = client.sessions()
    for listed in sessions:
        listed["counters"].pop("errors")
    return client.iotlb_show(device), sessions


@pytest.mark.parametrize("case", sorted(BAD_SESSION_REQUESTS))
def test_bad_session_requests_are_refused_by_name_and_change_nothing(daemon, client, vdpa_net, bystander, case):
    op, args, fd_kind, kind, words = BAD_SESSION_REQUESTS[case]
    with MemoryRegion(REGION_SIZE, "ram") as ram:
        session = client.open_session(vdpa_net.name)
        try:
            session.register(ram)
            session.commit([session.map(iova_far_from_us(session.iova_range, REGION_SIZE), ram, 0, REGION_SIZE)])
            before = state(client, vdpa_net.name)
            fds: list[int] = []
            if fd_kind == "pipe":
                fds = list(os.pipe())
            elif fd_kind == "unsealed":
                fds = [unsealed_memfd()]
            try:
                with pytest.raises(RemoteError) as refused:
                    client.call(op, {"session": session.number, **args}, fds[:1])
            finally:
                for fd in fds:
                    os.close(fd)
            assert refused.value.kind == kind and words in str(refused.value), str(refused.value)
            assert state(client, vdpa_net.name) == before
        finally:
            session.close()
    bystander()


@pytest.mark.parametrize("message, fds, words", [
    (b"\x00\xff garbage", 0, "not JSON"),
    (b"{}", 20, "more fds than the limit of 16"),
    (json.dumps({"v": VERSION, "id": 1, "op": "hello"}).encode() + b" " * (300 << 10), 0, "over the limit"),
    (json.dumps({"v": 99, "id": 1, "op": "hello"}).encode(), 0, "version 99 is not served"),
    (json.dumps({"v": VERSION, "id": 1, "op": "device.fly"}).encode(), 0, "unknown op 'device.fly'"),
    (b"[" * 50_000, 0, "nested too deep"),
])
def test_garbage_on_the_socket_is_refused_and_others_go_on(daemon, bystander, message, fds, words):
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock, open("/dev/null") as null:
        sock.connect(str(daemon.socket))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", [null.fileno()] * fds).tobytes())] if fds else [])
        reply, passed = wire.receive(sock)
        passed.close()
    assert reply["error"]["kind"] == "protocol" and words in reply["error"]["message"]
    bystander()


def test_a_peer_outside_the_group_is_refused_and_others_go_on(daemon, bystander):
    refused = run_cli(["session", "list", "--socket", str(daemon.socket)])
    assert refused.returncode == 5 and "(uid 65534) may not use vdpad: root only" in refused.stderr
    bystander()


def test_a_peer_outside_the_configured_group_is_refused(sim_modules):
    with running_daemon(config='group = "daemon"\n') as daemon:  # uid 65534 is not in it
        refused = run_cli(["session", "list", "--socket", str(daemon.socket)])
        assert refused.returncode == 5, refused
        assert "(uid 65534) may not use vdpad: root or members of group 'daemon'" in refused.stderr
        with daemon.client() as root:
            assert root.sessions() == []


def test_suspend_holds_frames_the_ring_bases_read_through_the_session_resume_delivers(client, vdpa_net):
    with MemoryRegion(REGION_SIZE, "ram") as ram:
        session = client.open_session(vdpa_net.name)
        try:
            session.register(ram)
            net, arena, _ = start_net(session, ram)
            with net, arena:
                first = frames(8, seed=40)
                assert net.exchange(first) == first
                session.device.suspend()
                assert session.device.get_vring_base(TX) == net.queues[TX].ring.avail_idx == len(first)
                assert session.device.get_vring_base(RX) == len(first)
                held = frames(8, seed=41)
                net.send(held)
                with pytest.raises(DriverError, match="used after"):
                    net.receive(1, timeout=0.5)  # suspended: the kick waits
                assert session.device.get_vring_base(TX) == len(first)
                session.device.resume()
                assert net.receive(len(held)) == held
        finally:
            session.close()


def test_a_group_moved_to_another_address_space_translates_through_it(client, vdpa_net):
    """group.set_asid reaches the kernel: the data queues' group in ASID 1, the memory mapped only there."""
    with MemoryRegion(REGION_SIZE, "ram") as ram, MemoryRegion(PAGE_SIZE, "decoy") as decoy:
        session = client.open_session(vdpa_net.name)
        try:
            assert session.info["as_num"] == 2
            session.register(ram)
            session.register(decoy)
            iova = iova_far_from_us(session.iova_range, REGION_SIZE)
            session.set_group_asid(session.device.get_vring_group(TX), 1)
            # ASID 0 loses its passthrough and maps nothing at the ring's IOVAs.
            session.commit([session.map(session.iova_range.first, decoy, 0, PAGE_SIZE)], asid=0)
            session.commit([session.map(iova, ram, 0, REGION_SIZE)], asid=1)
            net = NetDriver(session.device, arena := DmaArena(ram, iova))
            net.start()
            with net, arena:
                sent = frames(FRAMES, seed=42)
                assert net.exchange(sent) == sent
            shown = {space["asid"]: space for space in client.iotlb_show(vdpa_net.name)["spaces"]}
            assert [m["memory"] for m in shown[1]["map"]] == ["ram"]
            assert [m["memory"] for m in shown[0]["map"]] == ["decoy"]
        finally:
            session.close()


def test_a_config_call_eventfd_is_kept_by_the_session_until_unbound(client, vdpa_net):
    session = client.open_session(vdpa_net.name)
    try:
        with EventFd("config") as config_call:
            session.device.set_config_call(config_call.fileno())
        (listed,) = [s for s in client.sessions() if s["session"] == session.number]
        assert listed["eventfds"] == ["config call"]  # the daemon's duplicate outlives ours
        session.device.set_config_call(None)
        (listed,) = [s for s in client.sessions() if s["session"] == session.number]
        assert listed["eventfds"] == []
    finally:
        session.close()


def test_counters_add_up_and_never_go_down_when_a_session_closes(client, vdpa_net):
    before = client.status()["counters"]
    with MemoryRegion(REGION_SIZE, "ram") as ram:
        session = client.open_session(vdpa_net.name)
        session.register(ram)
        iova = iova_far_from_us(session.iova_range, REGION_SIZE)
        plans = [session.commit([session.map(iova, ram, 0, REGION_SIZE)]), session.commit([session.unmap(iova, PAGE_SIZE)])]
        session.reset()
        with pytest.raises(InvalidArgument):
            session.commit([session.map(iova, "nope", 0, PAGE_SIZE)])
        (listed,) = [s for s in client.sessions() if s["session"] == session.number]
        assert listed["counters"] == {"commits": 2, "iotlb_messages": sum(p["messages"] for p in plans),
                                      "resets": 1, "errors": 1, "misses_served": 0, "misses_unanswered": 0}
        session.close()
    after = client.status()["counters"]
    assert after["commits"] - before["commits"] == 2 and after["resets"] - before["resets"] == 1
    assert after["iotlb_messages"] - before["iotlb_messages"] == listed["counters"]["iotlb_messages"]


def test_memory_is_released_once_unmapped_and_refused_while_mapped(client, vdpa_net):
    with MemoryRegion(REGION_SIZE, "ram") as ram:
        session = client.open_session(vdpa_net.name)
        try:
            session.register(ram)
            iova = iova_far_from_us(session.iova_range, REGION_SIZE)
            session.commit([session.map(iova, ram, 0, REGION_SIZE)])
            with pytest.raises(RegionInUse):
                session.release("ram")
            session.commit([session.unmap(iova, REGION_SIZE)])
            session.release("ram")
            (listed,) = [s for s in client.sessions() if s["session"] == session.number]
            assert listed["memory"] == []
            with pytest.raises(InvalidArgument, match="no memory 'ram'"):
                session.commit([session.map(iova, "ram", 0, PAGE_SIZE)])
        finally:
            session.close()


def test_blk_sectors_through_a_session_in_pa_mode_across_a_replayed_reset(sim_modules):
    """vdpasim_blk over the daemon's maps; PA mode (the daemon pins), no IOTLB_PERSIST: the reset replays."""
    with sim_mode(use_va=False), running_daemon() as daemon, daemon.client() as client:
        name = f"blk{os.getpid() % 1000}"
        with vdpa_device(name, "vdpasim_blk"), MemoryRegion(REGION_SIZE, "blk-ram") as ram:
            session = client.open_session(name, persist=False)
            assert not session.info["persistent"] and session.info["device_id"] == 2
            session.register(ram)
            iova = iova_far_from_us(session.iova_range, REGION_SIZE)
            session.commit([session.map(iova, ram, 0, REGION_SIZE)])
            assert daemon.status("VmPin") == REGION_SIZE
            data = os.urandom(8 * 512)
            with DmaArena(ram, iova) as arena, BlkDriver(session.device, arena) as blk:
                blk.start()
                blk.write(64, data)
                assert blk.read(64, 8) == data
                session.reset()
                blk.start()
                assert blk.read(64, 8) == data
            session.close()
            assert daemon.status("VmPin") == 0


MID_TRANSACTION_CHILD = textwrap.dedent("""
    import sys
    from vdpad.client import Client
    from vdpad.iotlb import MemoryRegion
    client = Client(sys.argv[1])
    ram = MemoryRegion(int(sys.argv[3]), "child")
    session = client.open_session(sys.argv[2])
    session.register(ram)
    iova = max(session.info["iova_range"]["first"], 1 << 30)
    print(session.number, flush=True)
    while True:  # killed somewhere in here: between, or in the middle of, map and unmap commits
        session.commit([session.map(iova, ram, 0, ram.size)])
        session.commit([session.unmap(iova, ram.size)])
""")


def test_a_client_killed_mid_transaction_releases_everything_while_another_moves_frames(sim_modules):
    with sim_mode(use_va=False), running_daemon() as daemon:
        victim, other = f"kv{os.getpid() % 1000}", f"ko{os.getpid() % 1000}"
        with vdpa_device(victim, "vdpasim_net") as node, vdpa_device(other, "vdpasim_net"), \
                MemoryRegion(REGION_SIZE, "other-ram") as ram, daemon.client() as client:
            session = client.open_session(other)
            session.register(ram)
            net, arena, _ = start_net(session, ram)
            with net, arena:
                pinned = daemon.status("VmPin")
                fds = daemon.settled_fds()
                child = subprocess.Popen([sys.executable, "-c", MID_TRANSACTION_CHILD, str(daemon.socket), victim,
                                          str(8 << 20)], stdout=subprocess.PIPE, text=True)
                try:
                    child_session = int(child.stdout.readline())
                    for seed in range(5):  # traffic on the other device while the child commits
                        sent = frames(8, seed=40 + seed)
                        assert net.exchange(sent) == sent
                    commits = next(s for s in client.sessions() if s["session"] == child_session)["counters"]
                    assert commits["commits"] > 0
                    child.kill()
                    child.wait()
                finally:
                    child.kill()
                    child.wait()
                    child.stdout.close()
                deadline = time.monotonic() + 10
                while len(client.sessions()) > 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert [s["session"] for s in client.sessions()] == [session.number]
                assert daemon.status("VmPin") == pinned  # the child's pages, pinned or not when it died
                assert daemon.settled_fds(fds) == fds
                sent = frames(8, seed=50)
                assert net.exchange(sent) == sent
            session.close()
            with VhostVdpa(node):
                pass


def test_a_map_of_thousands_of_entries_with_long_names_shows_whole_in_pages(client, vdpa_net):
    pages = 2600  # entries that cannot merge (a gap between each); JSON escapes each "é" to 6 bytes
    name = "é" * 64
    with MemoryRegion(pages * PAGE_SIZE, "many") as ram:
        session = client.open_session(vdpa_net.name)
        try:
            session.register(ram, name)
            base = iova_far_from_us(session.iova_range, 2 * pages * PAGE_SIZE)
            for first in range(0, pages, 200):  # ~500 bytes of request apiece: 200 fit one message
                session.commit([session.map(base + 2 * n * PAGE_SIZE, name, n * PAGE_SIZE, PAGE_SIZE)
                                for n in range(first, min(first + 200, pages))])
            # Asked for 4096 of each, the daemon sends fewer: as many as fit one message.
            (first_page, _) = client.request("iotlb.show", device=vdpa_net.name, limit=4096)["spaces"]
            assert 0 < len(first_page["map"]) < pages and first_page["next"] is not None
            # Paged, the whole map comes through: every entry once, in order, in both lists.
            (space, _) = client.iotlb_show(vdpa_net.name)["spaces"]
            expected = [base + 2 * n * PAGE_SIZE for n in range(pages)]
            assert [m["iova"] for m in space["map"]] == [m["iova"] for m in space["kernel"]] == expected
            assert space["in_sync"] and "next" not in space and space["map"][0]["memory"] == name
        finally:
            session.close()
