"""vIOMMU domains through the daemon: vhost-net served by misses, invalidations, a vhost-vdpa device on the
same domain, and what the daemon refuses or survives."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from tests.service import running_daemon
from tests.sim import frames, iova_far_from_us, sim_mode, vdpa_device
from tests.tap import Tap, tap_device
from tests.viommu import HALF, PAGES, net_rig, page_by_page, wait_for
from vdpad.client import RemoteDomain, RemoteError
from vdpad.device import InvalidArgument, VirtioFeature
from vdpad.iotlb import PAGE_SIZE, MemoryRegion, Perm
from vdpad.mgmt.errors import Busy, NotFound
from vdpad.service.protocol import ProtocolError, Unauthorized
from vdpad.virtio import DmaArena, NetDriver

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def daemon(sim_modules):
    with running_daemon() as running:
        yield running


@pytest.fixture
def client(daemon):
    with daemon.client() as connected:
        yield connected


@pytest.fixture
def tap(sim_modules) -> Iterator[Tap]:
    with tap_device(f"vdtap{os.getpid() % 1000}") as made:
        yield made


def test_vhost_net_traffic_is_served_by_misses(client, tap):
    with net_rig(client, tap, "served") as rig:
        assert rig.misses() == {**rig.misses(), "prefetched": 2, "served": 0, "unmapped": 0, "denied": 0}
        sent = frames(8, seed=1)
        rig.driver.send(sent)
        assert tap.receive(8) == sent
        back = frames(4, seed=2)
        for frame in back:
            tap.send(frame)
        assert rig.driver.receive(4) == back
        misses = rig.misses()
        # Buffers of 12 frames over one-page mappings: TX slots and RX buffers on several pages, each a miss.
        assert misses["served"] >= 4 and misses["unmapped"] == misses["denied"] == misses["pending_count"] == 0
        # Everything the device holds came from the daemon and is exactly an entry of the domain.
        entries = rig.entries()
        assert misses["held"] and all(entries[iova]["size"] == size for iova, size in misses["held"])
        assert misses["held_count"] <= misses["served"] + misses["prefetched"]
        status = client.status()
        assert status["domains"] >= 1 and status["counters"]["misses_served"] >= misses["served"]
        assert rig.client.domains()[0]["misses"]["served"] == misses["served"]


def test_an_unmap_invalidates_before_the_reply_and_the_next_access_misses_again(client, tap):
    with net_rig(client, tap, "invalidate") as rig:
        first = frames(4, seed=3)
        rig.driver.send(first)
        assert tap.receive(4) == first
        held = {iova for iova, _ in rig.misses()["held"]}
        # One page the device holds taken away and given back: that translation goes, the others stay.
        cut = max(held)
        page = (cut - rig.iova) // PAGE_SIZE
        rig.domain.commit([rig.domain.unmap(cut, PAGE_SIZE), *page_by_page(rig.domain, rig.iova, page, 1)])
        before = rig.misses()
        assert {iova for iova, _ in before["held"]} == held - {cut} and len(held) > 1
        assert before["held_count"] > 0
        # Unmapped and mapped back at once: the map is the same, but the device must ask again.
        reply = rig.domain.commit([rig.domain.unmap(rig.iova, HALF), *page_by_page(rig.domain, rig.iova, 0, HALF // PAGE_SIZE)])
        assert reply["invalidated"] == 1
        after = rig.misses()
        assert after["held_count"] == 0 and after["invalidated"] == before["invalidated"] + 1
        again = frames(4, seed=4)
        rig.driver.send(again)
        assert tap.receive(4) == again
        assert rig.misses()["served"] > before["served"]


def test_an_unanswerable_miss_is_counted_and_answered_once_mapped(daemon, client, tap):
    with net_rig(client, tap, "unanswered") as rig:
        pages, domain = HALF // PAGE_SIZE, rig.domain
        domain.commit([domain.unmap(rig.iova, HALF)])
        sent = frames(1, seed=5)
        rig.driver.send(sent)
        missed = wait_for("an unmapped miss", lambda: rig.misses()["unmapped"] >= 1 and rig.misses())
        assert all(rig.iova <= p["iova"] < rig.iova + HALF and p["reason"] == "unmapped" for p in missed["pending"])
        with daemon.client() as other:  # the daemon serves everyone else meanwhile
            assert other.status()["counters"]["misses_unanswered"] >= 1
        with pytest.raises(TimeoutError):
            tap.receive(1, timeout=0.5)  # the queue waits, as under QEMU
        # Mapped again: what waited is answered by the commit, and the frame goes out.
        domain.commit(page_by_page(domain, rig.iova, 0, pages))
        assert tap.receive(1) == sent
        assert rig.misses()["late"] >= 1
        # The buffers write-only (the rings, pages 0 and 1, stay as they were): the device asks to read the
        # next TX buffer, and the domain denies it.
        domain.commit([domain.unmap(rig.iova + 2 * PAGE_SIZE, HALF - 2 * PAGE_SIZE),
                       *page_by_page(domain, rig.iova, 2, pages - 2, Perm.WO)])
        again = frames(1, seed=6)
        rig.driver.send(again)
        denied = wait_for("a denied miss", lambda: rig.misses()["denied"] >= 1 and rig.misses())
        assert [(p["reason"], p["perm"]) for p in denied["pending"]] == [("denied", "RO")]
        domain.commit([domain.unmap(rig.iova + 2 * PAGE_SIZE, HALF - 2 * PAGE_SIZE),
                       *page_by_page(domain, rig.iova, 2, pages - 2)])
        assert tap.receive(1) == again


def test_a_vdpa_device_on_the_same_domain_carries_frames(client, tap, vdpa_net):
    with ExitStack() as stack:
        probe = stack.enter_context(client.open_session(vdpa_net.name))
        iova = iova_far_from_us(probe.iova_range, PAGES * PAGE_SIZE)
        probe.close()
        rig = stack.enter_context(net_rig(client, tap, "shared", iova))
        vdpa = stack.enter_context(client.open_session(vdpa_net.name))
        rig.domain.attach(vdpa)
        shown = client.iotlb_show(vdpa_net.name)["spaces"][0]
        assert [(e["iova"], e["size"]) for e in shown["map"]] == [(e["iova"], e["size"]) for e in rig.entries().values()]
        assert shown["in_sync"]
        arena = stack.enter_context(DmaArena(rig.ram, iova + HALF, offset=HALF, size=HALF))
        with NetDriver(vdpa.device, arena) as loop:
            loop.start()
            sent = frames(8, seed=6)
            assert loop.exchange(sent) == sent
            rig.driver.send(sent[:2])
            assert tap.receive(2) == sent[:2]
            # Its own commits on the address space that follows the domain are refused, changing nothing.
            with pytest.raises(InvalidArgument, match="follows domain shared"):
                vdpa.commit([vdpa.unmap(iova, PAGE_SIZE)])
            # A domain change reaches it before the reply: its map follows, and frames still flow.
            rig.domain.commit([rig.domain.unmap(iova + HALF, HALF), rig.domain.map(iova + HALF, "ram-b", HALF, HALF)])
            shown = client.iotlb_show(vdpa_net.name)["spaces"][0]
            assert (iova + HALF, HALF) in [(e["iova"], e["size"]) for e in shown["map"]] and shown["in_sync"]
            again = frames(8, seed=7)
            assert loop.exchange(again) == again
        rig.domain.detach(vdpa)
        assert client.iotlb_show(vdpa_net.name)["spaces"][0]["map"] == []
        assert vdpa.commit([])["messages"] == 0  # its own again: its commits are taken


def test_a_reset_drops_what_waited_and_the_driver_starts_again_on_the_same_domain(client, tap):
    with net_rig(client, tap, "reset") as rig:
        rig.domain.commit([rig.domain.unmap(rig.iova, HALF)])
        rig.driver.send(frames(1, seed=9))
        wait_for("an unmapped miss", lambda: rig.misses()["pending_count"] >= 1)
        rig.net.device.set_status(0)  # RESET_OWNER: the queues, the IOTLB and what waited go
        after = rig.misses()
        assert after["pending_count"] == after["held_count"] == 0 and after["running"]
        rig.domain.commit(page_by_page(rig.domain, rig.iova, 0, HALF // PAGE_SIZE))
        rig.driver.start()
        sent = frames(4, seed=10)
        rig.driver.send(sent)
        assert tap.receive(4) == sent
        assert rig.misses()["prefetched"] == after["prefetched"] + 2


def test_an_empty_domain_takes_the_parents_initial_map_away(client, vdpa_net):
    with client.create_domain("empty") as domain, client.open_session(vdpa_net.name) as vdpa:
        assert client.iotlb_show(vdpa_net.name)["spaces"][0]["initial"]  # vdpa_sim's 1:1 passthrough
        domain.attach(vdpa)
        space = client.iotlb_show(vdpa_net.name)["spaces"][0]
        assert not space["initial"] and space["map"] == space["kernel"] == [] and space["in_sync"]
        with pytest.raises(InvalidArgument, match="has AS 0 attached to domain empty already"):
            domain.attach(vdpa, asid=1)


def test_refusals_name_what_was_wrong_and_change_nothing(daemon, client, tap, vdpa_net):
    with net_rig(client, tap, "refusals") as rig:
        before = rig.domain.show()
        domain, iova = rig.domain, rig.iova
        refused = [
            (lambda: domain.commit([domain.map(iova - HALF, "nothing", 0, PAGE_SIZE)]), InvalidArgument,
             "no memory 'nothing'"),
            (lambda: domain.commit([domain.map(iova + PAGE_SIZE, "ram-a", 0, PAGE_SIZE)]), InvalidArgument, "overlaps"),
            (lambda: domain.commit([domain.unmap(iova - HALF, PAGE_SIZE)]), InvalidArgument, "nothing is mapped"),
            (lambda: domain.commit([domain.map(iova - HALF, "ram-a", PAGE_SIZE * PAGES, PAGE_SIZE)]), InvalidArgument,
             "page-aligned window"),
            (lambda: domain.commit([domain.unmap(iova, PAGE_SIZE), domain.map(iova + 3, "ram-a", 0, PAGE_SIZE)]),
             InvalidArgument, "page-aligned"),
            (lambda: domain.release("ram-a"), InvalidArgument, "is mapped at"),
            (lambda: domain.attach(rig.net), InvalidArgument, "attached to domain refusals already"),
            (lambda: rig.net.commit([]), ProtocolError, "needs a vhost-vdpa one"),
            (lambda: client.create_domain("refusals"), Busy, "exists already"),
        ]
        for call, kind, problem in refused:
            with pytest.raises(kind, match=problem):
                call()
        assert rig.domain.show() == {**before, "misses": rig.domain.show()["misses"]}
        # A vhost-vdpa address space with maps of its own is not taken over.
        with client.open_session(vdpa_net.name) as vdpa, MemoryRegion(PAGE_SIZE, "own") as own:
            vdpa.register(own)
            first = iova_far_from_us(vdpa.iova_range, PAGE_SIZE)
            vdpa.commit([vdpa.map(first, own, 0, PAGE_SIZE)])
            with pytest.raises(InvalidArgument, match="maps 1 entries of its own"):
                domain.attach(vdpa)
            with pytest.raises(InvalidArgument, match="asid=5 is not below"):
                domain.attach(vdpa, asid=5)
        # Another client can see the domain, not change it.
        with daemon.client() as other:
            assert "refusals" in {d["domain"] for d in other.domains()}
            with pytest.raises(Unauthorized, match="belongs to another client"):
                RemoteDomain(other, "refusals").commit([])
        with pytest.raises(NotFound, match="no domain 'absent'"):
            client.domain_show("absent")


def test_a_vhost_net_session_refuses_what_would_bypass_its_domain(client, tap):
    with client.open_vhost_net(tap.fd) as net:
        offered = net.device.get_features()
        with pytest.raises(InvalidArgument, match="ACCESS_PLATFORM must be acked"):
            net.device.set_features(offered & VirtioFeature.VERSION_1)
        net.device.set_features(offered & (VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM))
        with pytest.raises(InvalidArgument, match="needs a domain"):
            net.device.set_status(0xF)
    with MemoryRegion(PAGE_SIZE, "x") as not_a_tap, pytest.raises(RemoteError, match="not a tap"):
        client.open_vhost_net(not_a_tap.fd)


def test_a_miss_storm_is_counted_with_a_rate_limited_log_while_others_are_served(daemon, client, tap):
    with net_rig(client, tap, "storm") as rig:
        rig.domain.commit([rig.domain.unmap(rig.iova, HALF)])
        tx = rig.driver.queues[1]
        rig.driver.send(frames(1, seed=8))
        started = time.monotonic()
        with daemon.client() as other:
            for kick in range(2000):  # each kick makes the waiting queue ask again
                tx.kick()
                if kick % 200 == 0:
                    assert other.status()["counters"]["misses_unanswered"] >= 0  # answers meanwhile
        storm = wait_for("the storm's misses", lambda: rig.misses()["unmapped"] >= 100 and rig.misses())
        seconds = time.monotonic() - started + 1
        told = len(re.findall(r"iotlb\.miss_unanswered", daemon.log_text()))
        assert told <= 10 * (seconds + 1) < storm["unmapped"]


CHILD = textwrap.dedent("""
    import os, sys, time
    from tests.tap import tap_device
    from vdpad.client import Client
    from vdpad.iotlb import MemoryRegion
    client = Client(sys.argv[1])
    ram = MemoryRegion(1 << 20, "child")
    with tap_device(sys.argv[2]) as tap:
        domain = client.create_domain("child")
        domain.register(ram)
        domain.commit([domain.map(1 << 32, ram, 0, ram.size)])
        net = client.open_vhost_net(tap.fd)
        domain.attach(net)
        print(net.number, flush=True)
        time.sleep(600)
""")


def test_a_client_dying_with_domains_attached_leaves_nothing_behind(daemon):
    fds_before = daemon.settled_fds()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(daemon.socket), f"vdkill{os.getpid() % 1000}"],
                             stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        number = int(child.stdout.readline())
        with daemon.client() as watcher:
            assert [d["domain"] for d in watcher.domains()] == ["child"]
            assert number in {s["session"] for s in watcher.sessions()}
            child.send_signal(signal.SIGKILL)
            child.wait()
            wait_for("the domain to go", lambda: not watcher.domains() and not watcher.sessions())
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert daemon.settled_fds(fds_before) == fds_before


def test_a_commit_one_device_refuses_is_undone_on_the_devices_that_took_it(sim_modules):
    """PA mode, each device pinning what it maps: the first device takes the commit, the daemon's memlock budget
    refuses it on the second; the first is brought back, and the domain, both maps and the pins are as before."""
    size = 1 << 20
    names = [f"dpin{os.getpid() % 1000}x{n}" for n in range(2)]
    with sim_mode(use_va=False), running_daemon(memlock=3 * size // 2) as daemon, ExitStack() as stack:
        for name in names:
            stack.enter_context(vdpa_device(name, "vdpasim_net"))
        ram = stack.enter_context(MemoryRegion(size, "ram"))
        client = stack.enter_context(daemon.client())
        domain = stack.enter_context(client.create_domain("pinned"))
        domain.register(ram)
        sessions = [stack.enter_context(client.open_session(name)) for name in names]
        iova = iova_far_from_us(sessions[0].iova_range, size)
        for session in sessions:
            domain.attach(session)
        domain.commit([domain.map(iova, ram, 0, PAGE_SIZE)])
        before = [client.iotlb_show(name)["spaces"][0] for name in names]
        pinned = daemon.status("VmPin")
        assert pinned == 2 * PAGE_SIZE
        with pytest.raises(InvalidArgument, match="RLIMIT_MEMLOCK"):
            domain.commit([domain.map(iova + PAGE_SIZE, ram, PAGE_SIZE, size - PAGE_SIZE)])
        assert [client.iotlb_show(name)["spaces"][0] for name in names] == before
        assert [(e["iova"], e["size"]) for e in domain.show()["map"]] == [(iova, PAGE_SIZE)]
        assert daemon.status("VmPin") == pinned
