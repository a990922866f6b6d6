"""Live migration through the daemon, in the VM (docs/migration.md): vdpasim_net to vdpasim_net while a
client streams numbered frames; the cvq's group and address space; a failure at each step of the
destination's load; bad documents; a restart in place; vdpasim_blk in PA mode."""

from __future__ import annotations

import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.service import running_daemon
from tests.sim import blk_shared_backend, frames, iova_far_from_us, sim_mode, vdpa_device
from vdpad.client import RemoteSession
from vdpad.device import InvalidArgument, NotSupportedError
from vdpad.iotlb import MemoryRegion
from vdpad.service.switchover import FAIL_AT_ENV, LOAD_STEPS
from vdpad.virtio import BlkDriver, DmaArena, NetDriver
from vdpad.virtio.net import CTRL

pytestmark = pytest.mark.kernel

REGION_SIZE = 1 << 20
BATCH = 8
TIMEOUT = 30.0  # s a frame may wait: the switch-over happens meanwhile, under TCG


@pytest.fixture(scope="module")
def daemon(sim_modules):
    with running_daemon() as running:
        yield running


class Stream:
    """A thread that sends numbered frames through `net` and receives them back, batch after batch."""

    def __init__(self, net: NetDriver):
        self.net = net
        self.sent: list[bytes] = []
        self.received: list[bytes] = []
        self.batches = 0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="stream")

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = frames(BATCH, seed=1000 + self.batches)
                self.sent += batch
                self.net.send(batch, TIMEOUT)
                self.received += self.net.receive(len(batch), TIMEOUT)
                self.batches += 1
        except BaseException as error:  # noqa: BLE001 - raised again by the test's thread in stop()
            self._error = error

    def __enter__(self) -> Stream:
        self._thread.start()
        self.wait_for(2)
        return self

    def wait_for(self, batches: int) -> None:
        """Until `batches` more have gone through (or the thread failed)."""
        target = self.batches + batches
        while self.batches < target and self._thread.is_alive():
            self._thread.join(0.05)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2 * TIMEOUT)
        if self._error is not None and exc[0] is None:
            raise self._error


def open_pair(client, src: str, dst: str, ram):
    """A running net driver on device `src`'s session, and `dst`'s session prepared: the same memory
    registered and mapped at the same IOVAs."""
    source, destination = client.open_session(src), client.open_session(dst)
    iova = iova_far_from_us(source.iova_range, ram.size)
    for session in (source, destination):
        session.register(ram)
        session.commit([session.map(iova, ram, 0, ram.size)])
    arena = DmaArena(ram, iova)
    net = NetDriver(source.device, arena)
    net.start()
    return source, destination, net, arena


def counters(client, session: RemoteSession) -> dict:
    (listed,) = [s for s in client.sessions() if s["session"] == session.number]
    return listed["counters"]


def assert_untouched(client, destination: RemoteSession, shown_before: dict) -> None:
    assert destination.device.get_status() == 0
    assert client.iotlb_show(destination.info["device"]) == shown_before


@pytest.mark.parametrize("use_va", [True, False], ids=["va", "pa"])
def test_frames_stream_through_a_migration_exactly_once_in_order(daemon, use_va):
    tag = os.getpid() % 1000
    with sim_mode(use_va=use_va), vdpa_device(f"ms{tag}s", "vdpasim_net"), \
            vdpa_device(f"ms{tag}d", "vdpasim_net"), daemon.client() as client, \
            MemoryRegion(REGION_SIZE, "ram") as ram:
        source, destination, net, arena = open_pair(client, f"ms{tag}s", f"ms{tag}d", ram)
        with net, arena:
            net.bind(destination.device)  # ahead of the switch-over, as the maps were
            with Stream(net) as stream:
                state = source.migrate_to(destination)
                net.carry_on(destination.device)
                at_switch = len(stream.sent)
                source.close()  # resets the source: the destination carries on alone
                stream.wait_for(3)
            assert stream.received == stream.sent and len(stream.sent) > at_switch + 2 * BATCH
            assert len(set(stream.sent)) == len(stream.sent)
            assert json.loads(json.dumps(state)) == state
            assert state["device_id"] == 1 and [q["enabled"] for q in state["queues"]] == [True, True, False]
            assert state["spaces"][0]["map"] == [
                {"iova": arena.iova, "size": REGION_SIZE, "memory": "ram", "offset": 0, "perm": "rw"}]
            # What the destination was loaded with is what it reports now.
            assert destination.device.get_vring_base(1) == net.queues[1].ring.avail_idx
        destination.close()


def test_the_cvq_moves_with_its_group_into_the_destinations_address_space_1(daemon, sim_device):
    """The cvq's group in AS 1 with memory of its own, mapped there on the source only: the load maps it and
    moves the group; MAC_ADDR_SET through the cvq works on the destination."""
    src, dst = sim_device("vdpasim_net"), sim_device("vdpasim_net")
    with daemon.client() as client, MemoryRegion(REGION_SIZE, "ram") as ram, \
            MemoryRegion(16 * 4096, "ctrl") as ctrl:
        source, destination = client.open_session(src.name), client.open_session(dst.name)
        iova = iova_far_from_us(source.iova_range, REGION_SIZE)
        for session in (source, destination):
            session.register(ram)
            session.register(ctrl)
            session.commit([session.map(iova, ram, 0, REGION_SIZE)])
        cvq_group = source.device.get_vring_group(CTRL)
        source.set_group_asid(cvq_group, 1)
        source.commit([source.map(iova, ctrl, 0, ctrl.size)], asid=1)  # the same IOVA as the data, in AS 1
        with DmaArena(ram, iova) as data, DmaArena(ctrl, iova) as ctrl_arena, \
                NetDriver(source.device, data, ctrl=ctrl_arena) as net:
            net.start()
            net.set_mac(first := bytes.fromhex("02766470610a"))
            assert net.exchange(unicast := frames(BATCH, dst=first, seed=5)) == unicast
            net.bind(destination.device)
            state = source.migrate_to(destination)
            net.carry_on(destination.device)
            assert state["groups"][cvq_group] == 1 and [q["enabled"] for q in state["queues"]] == [True] * 3
            assert [m["memory"] for m in state["spaces"][1]["map"]] == ["ctrl"]
            net.set_mac(second := bytes.fromhex("02766470610b"))
            assert net.config_mac() == second  # the destination's config
            assert net.exchange(unicast := frames(BATCH, dst=second, seed=6)) == unicast
        shown = {space["asid"]: space for space in client.iotlb_show(dst.name)["spaces"]}
        assert [m["memory"] for m in shown[1]["map"]] == ["ctrl"]
        source.close()
        destination.close()


def test_a_device_that_cannot_suspend_is_not_saved_and_runs_on(daemon, vduse_device):
    """VDUSE (qemu-storage-daemon's vduse-blk) offers no SUSPEND: the save is refused, the device untouched."""
    with daemon.client() as client, MemoryRegion(REGION_SIZE, "ram") as ram:
        session = client.open_session(vduse_device.name)
        session.register(ram)
        iova = iova_far_from_us(session.iova_range, REGION_SIZE)
        session.commit([session.map(iova, ram, 0, REGION_SIZE)])
        with DmaArena(ram, iova) as arena, BlkDriver(session.device, arena) as blk:
            blk.start()
            with pytest.raises(NotSupportedError, match="SUSPEND on .*: not supported by this device"):
                session.save()
            blk.write(0, data := os.urandom(2 * 512))
            assert blk.read(0, 2) == data
        session.close()


@pytest.fixture(scope="module")
def failing_daemon(sim_modules, tmp_path_factory):
    """A daemon whose loads fail before the step named in `.fail_at` (a file)."""
    fail_at = tmp_path_factory.mktemp("fail") / "step"
    with running_daemon(env={FAIL_AT_ENV: str(fail_at)}) as running:
        running.fail_at = fail_at
        yield running


@pytest.mark.parametrize("step", list(LOAD_STEPS))
def test_a_failure_at_each_step_of_the_load_resumes_the_source(failing_daemon, sim_device, step):
    src, dst = sim_device("vdpasim_net"), sim_device("vdpasim_net")
    failing_daemon.fail_at.write_text(step)
    with failing_daemon.client() as client, MemoryRegion(REGION_SIZE, "ram") as ram:
        source, destination, net, arena = open_pair(client, src.name, dst.name, ram)
        with net, arena:
            net.bind(destination.device)
            with Stream(net) as stream:
                with pytest.raises(OSError, match=f"failure injected at step '{step}'") as raised:
                    source.migrate_to(destination)
                assert "was reset and its maps emptied" in str(raised.value)
                net.carry_on(source.device)  # resumed: kicked, as vdpa_sim may have dropped a burst's rest
                stream.wait_for(3)
            assert stream.received == stream.sent
        assert destination.device.get_status() == 0
        (nothing,) = [s for s in client.sessions() if s["session"] == destination.number]
        assert nothing["mapped"] == 0


def bad(change):
    def changed(state: dict) -> dict:
        state = json.loads(json.dumps(state))
        change(state)
        return state
    return changed


BAD_DOCUMENTS = [
    (bad(lambda s: s.update(device_id=2)), "state.device_id: the state is of virtio device 2 (block)"),
    (bad(lambda s: s["queues"].pop()), "state.queues: 2 virtqueues"),
    (bad(lambda s: s["queues"].append({"index": 3, "enabled": False})), "state.queues: 4 virtqueues"),
    (bad(lambda s: s["queues"][0].update(size=512)), "state.queues[0].size: a ring of 512"),
    (bad(lambda s: s.update(features=s["features"] | 1 << 62)), "state.features: "),
    (bad(lambda s: s["spaces"].append({"asid": 2, "map": []})), "state.spaces[2]: "),
    (bad(lambda s: s["spaces"][0]["map"][0].update(memory="elsewhere")),
     "state.spaces[0].map[0].memory: 'elsewhere' is not registered"),
    (bad(lambda s: s.update(version=2)), "state.version: 2 is not the version"),
    (bad(lambda s: s["spaces"][0]["map"][0].update(iova=s["spaces"][0]["map"][0]["iova"] + 512)),
     "state.spaces[0].map[0].iova: "),
    (bad(lambda s: s["spaces"][0]["map"].append(dict(s["spaces"][0]["map"][0]))),
     "state.spaces[0].map[1].iova: "),
    (bad(lambda s: s["queues"][0].update(desc=s["queues"][0]["desc"] + 8)), "state.queues[0].desc: "),
    (bad(lambda s: s.update({"groups[0]": 1})), "unknown field(s) 'groups[0]'"),
]


def test_bad_documents_are_refused_by_field_and_change_nothing(daemon, sim_device):
    src, dst = sim_device("vdpasim_net"), sim_device("vdpasim_net")
    with daemon.client() as client, MemoryRegion(REGION_SIZE, "ram") as ram:
        source, destination, net, arena = open_pair(client, src.name, dst.name, ram)
        with net, arena:
            net.bind(destination.device)
            sent = frames(BATCH, seed=1)
            assert net.exchange(sent) == sent
            shown = client.iotlb_show(dst.name)
            with pytest.raises(InvalidArgument, match="only a running device"):
                destination.save()  # reset: nothing to save
            state = source.save()
            for change, words in BAD_DOCUMENTS:
                with pytest.raises(InvalidArgument, match=re.escape(words)):
                    destination.load(change(state))
                assert_untouched(client, destination, shown)
            source.device.resume()  # the source was only suspended: it carries on
            assert net.exchange(sent) == sent
            # The document as it was loads: the refusals were the fields'.
            state = source.save()
            destination.load(state)
            net.carry_on(destination.device)
            assert net.exchange(sent) == sent
        source.close()
        destination.close()


@pytest.mark.parametrize("persist", [True, False], ids=["kept", "replayed"])
def test_a_restart_in_place_carries_on_where_the_device_stopped(daemon, vdpa_net, persist):
    with daemon.client() as client, MemoryRegion(REGION_SIZE, "ram") as ram:
        session = client.open_session(vdpa_net.name, persist=persist)
        session.register(ram)
        iova = iova_far_from_us(session.iova_range, ram.size)
        session.commit([session.map(iova, ram, 0, ram.size)])
        with NetDriver(session.device, arena := DmaArena(ram, iova)) as net, arena:
            net.start()
            first = frames(BATCH, seed=2)
            assert net.exchange(first) == first
            state = session.save()
            held = frames(BATCH, seed=3)
            net.send(held)  # queued while suspended; the restarted device reads them
            messages = counters(client, session)["iotlb_messages"]
            assert session.reset() == {"persistent": persist}
            net.bind(session.device)  # a reset forgets the call eventfds
            session.load(json.loads(json.dumps(state)))
            net.carry_on(session.device)
            assert net.receive(len(held)) == held
            again = frames(BATCH, seed=4)
            assert net.exchange(again) == again
            assert session.device.get_vring_base(1) == 3 * BATCH
            assert counters(client, session)["iotlb_messages"] == messages  # the load found the maps in place
        session.close()


def write_across_the_switch_over(blk: BlkDriver, source, destination, sector: int, data: bytes) -> dict:
    """Save the source, write `data` at `sector` into its suspended ring (the request waits), load the
    destination and carry on there: the write completes on the destination. The saved state."""
    state = source.save()
    with ThreadPoolExecutor(1) as pool:
        writing = pool.submit(blk.write, sector, data, TIMEOUT)
        with pytest.raises(TimeoutError):
            writing.result(0.5)  # the suspended source holds it
        destination.load(state)
        blk.carry_on(destination.device)
        writing.result(TIMEOUT)  # done by the destination (a failed write raises here)
    return state


def test_blk_in_pa_mode_carries_a_queued_request_over_and_an_abort_unpins_the_destination(failing_daemon):
    """vdpasim_blk, each device with a RAM disk of its own, pages pinned by the daemon: a write queued while the
    source is suspended is done by the destination; a failed load leaves the destination nothing pinned."""
    daemon = failing_daemon
    tag = os.getpid() % 1000
    with sim_mode(use_va=False), vdpa_device(f"mb{tag}s", "vdpasim_blk"), vdpa_device(f"mb{tag}d", "vdpasim_blk"), \
            daemon.client() as client, MemoryRegion(REGION_SIZE, "ram") as ram:
        source, destination = client.open_session(f"mb{tag}s"), client.open_session(f"mb{tag}d")
        iova = iova_far_from_us(source.iova_range, REGION_SIZE)
        for session in (source, destination):
            session.register(ram)
            session.commit([session.map(iova, ram, 0, REGION_SIZE)])
        assert daemon.status("VmPin") == 2 * REGION_SIZE
        with DmaArena(ram, iova) as arena, BlkDriver(source.device, arena) as blk:
            blk.start()
            blk.write(8, first := os.urandom(4 * 512))
            blk.bind(destination.device)
            daemon.fail_at.write_text("driver_ok")
            with pytest.raises(OSError, match="failure injected at step 'driver_ok'"):
                source.migrate_to(destination)
            assert daemon.status("VmPin") == REGION_SIZE  # the destination's maps are gone
            blk.carry_on(source.device)
            assert blk.read(8, 4) == first

            daemon.fail_at.write_text("")
            destination.commit([destination.map(iova, ram, 0, REGION_SIZE)])  # prepared again
            blk.bind(destination.device)
            queued = os.urandom(4 * 512)
            state = write_across_the_switch_over(blk, source, destination, 16, queued)
            assert blk.read(16, 4) == queued  # from the destination's disk: the source's never saw it
            assert blk.read(8, 4) != first  # a disk of its own: what the source wrote is not there
            assert destination.device.get_vring_base(0) == state["queues"][0]["base"] + 3  # the write and two reads
        source.close()
        assert daemon.status("VmPin") == REGION_SIZE
        destination.close()
        assert daemon.status("VmPin") == 0


def test_blk_data_written_before_the_switch_over_reads_back_on_the_destination(daemon, sim_modules):
    """vdpasim_blk with shared_backend=1 plays a migration's shared storage: sectors the source wrote read back
    identical through the destination; a write queued on the suspended source completes exactly once there."""
    tag = os.getpid() % 1000
    with blk_shared_backend(), vdpa_device(f"mk{tag}s", "vdpasim_blk"), vdpa_device(f"mk{tag}d", "vdpasim_blk"), \
            daemon.client() as client, MemoryRegion(REGION_SIZE, "ram") as ram:
        source, destination = client.open_session(f"mk{tag}s"), client.open_session(f"mk{tag}d")
        iova = iova_far_from_us(source.iova_range, REGION_SIZE)
        for session in (source, destination):  # the destination mapped early
            session.register(ram)
            session.commit([session.map(iova, ram, 0, REGION_SIZE)])
        with DmaArena(ram, iova) as arena, BlkDriver(source.device, arena) as blk:
            blk.start()
            before = os.urandom(8 * 512)
            blk.write(40, before)
            blk.bind(destination.device)
            queued = os.urandom(2 * 512)
            state = write_across_the_switch_over(blk, source, destination, 80, queued)
            source.close()  # reset: only the destination runs from here
            assert blk.read(40, 8) == before and blk.read(80, 2) == queued
            # Exactly once: the destination consumed the queued write and the two reads, nothing more.
            assert destination.device.get_vring_base(0) == state["queues"][0]["base"] + 3
        destination.close()


def test_a_load_that_would_pin_beyond_the_memlock_limit_is_refused_before_anything_changes(sim_modules):
    """PA mode, the destination left unmapped: the load would pin the memory again, over RLIMIT_MEMLOCK."""
    tag = os.getpid() % 1000
    with sim_mode(use_va=False), running_daemon(memlock=REGION_SIZE + REGION_SIZE // 2) as daemon, \
            vdpa_device(f"ml{tag}s", "vdpasim_net"), vdpa_device(f"ml{tag}d", "vdpasim_net"), \
            daemon.client() as client, MemoryRegion(REGION_SIZE, "ram") as ram:
        source, destination = client.open_session(f"ml{tag}s"), client.open_session(f"ml{tag}d")
        iova = iova_far_from_us(source.iova_range, REGION_SIZE)
        source.register(ram)
        destination.register(ram)
        source.commit([source.map(iova, ram, 0, REGION_SIZE)])
        with DmaArena(ram, iova) as arena, NetDriver(source.device, arena) as net:
            net.start()
            net.bind(destination.device)
            shown = client.iotlb_show(destination.info["device"])
            with pytest.raises(InvalidArgument, match=r"state\.spaces\[0\]\.map: .*RLIMIT_MEMLOCK is 0x180000"):
                source.migrate_to(destination)
            assert_untouched(client, destination, shown)
            assert daemon.status("VmPin") == REGION_SIZE
            sent = frames(BATCH, seed=7)
            net.carry_on(source.device)  # resumed by the daemon
            assert net.exchange(sent) == sent
        source.close()
        destination.close()
