"""How fast a device-IOTLB miss is answered: vdpad against a bare C loop (run inside the VM:
`make bench-misses`).

On /dev/vhost-net with ACCESS_PLATFORM acked and a tap as the TX backend,
each server on a fresh device of its own, with the same workload, in one run:

- the reference: a C loop compiled here at run time with cffi (into a
  temporary directory, never kept) that does what MissServer does: poll the
  fd and a stop fd, read one MISS (struct vhost_msg_v2), find the covering
  entry in a sorted table (binary search), write one UPDATE for it (nothing
  when unmapped or denied), each miss timed from after its read to after its
  write (CLOCK_MONOTONIC). It runs in a thread (cffi releases the GIL) while
  the main thread drives the device;
- vdpad.service.misses.MissServer in this process over the same map, its
  service times read from its `service_times()`;
- the daemon: `vdpad serve` as a process of its own (tests/service.py), the
  device a vhost-net session of it attached to a domain that maps the same
  memory (registered), its ring set up through the session's device calls,
  the kicks written here on the bench's own eventfd (the daemon holds a
  duplicate); its service times and misses served as the session's record
  tells them (`misses`: `service_us`, `served`).

The workload: a map of FRAMES one-page buffers whose mappings never merge
(their permissions alternate, RO and RW), the TX ring mapped apart and
translated before the tap is attached; rounds of FRAMES TX frames (a
virtio_net_hdr_v1 and a 60-byte broadcast frame no stack claims, one per
buffer page), one kick, every frame used (the driver asks, by EVENT_IDX, to
be woken at the round's last frame only), then one INVALIDATE of the buffers
so the next round misses on each of them again (in the daemon: a domain
commit that unmaps the buffers and maps them again, which INVALIDATEs before
its reply). The first round on each device is a warm-up, not counted: the
daemon's session is then detached and attached again, so that a fresh miss
server tells the counted rounds' times alone (the device forgets the ring's
translation too: one miss more, for the ring, in its first counted round).
Per server and repetition: misses served, p50 and p99 service time (nearest
rank, as the daemon tells them: vdpad.service.misses.service_percentiles),
and misses served per second of the serving phases (from a round's kick to
its last frame used). The servers take turns, their order rotating every
repetition.

    python -m tests.bench.misses [--out DIR] [--repetitions N] [--rounds N]

Writes DIR/misses.json (default DIR: $VDPAD_VM_OUT); tests/bench/plot_misses.py draws it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.bench.common import compile_c
from tests.service import running_daemon
from tests.sim import BROADCAST, ETHERTYPE_EXPERIMENTAL
from tests.tap import VNET_HDR_V1, Tap, tap_device
from vdpad.client import Client, RemoteDomain, SessionDevice
from vdpad.device import (
    Access, BackendFeature, DeviceStatus, EventFd, IotlbMessage, MessageType, VhostNet, VirtioFeature, VringAddr,
)
from vdpad.device.net import TX
from vdpad.iotlb import PAGE_SIZE, MemoryRegion
from vdpad.iotlb.space import AddressMap, Mapping
from vdpad.service.misses import MissServer, service_percentiles
from vdpad.virtio.ring import U16, Buffer, RingLayout, SplitRing

VHOST_NET = "/dev/vhost-net"
FRAMES = 256  # TX frames a round, each in a buffer page of its own: the ring's size, so a round fills it
RING_IOVA = 0x4000_0000
BUFFER_IOVA = 0x4010_0000  # apart from the ring: a buffer's mapping never continues the ring's
FRAME = 60  # bytes of Ethernet frame after the header
FEATURES = VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM | VirtioFeature.EVENT_IDX
ROUND_TIMEOUT_S = 30.0
P50_RATIO_TARGET = 3.0  # a server's median service time over the C loop's
RATE_RATIO_TARGET = 1 / 3  # a server's misses per second as a share of the C loop's
SERVERS = ("c_loop", "miss_server", "daemon")
DAEMON_LOG = {"VDPAD_LOG": "warning"}  # the daemon's default: no debug event per commit
DOMAIN = "bench-misses"
MEMORY = "bench"  # the workload's memory, as the domain names it

C_DECLARATIONS = """
struct miss_entry { uint64_t iova; uint64_t size; uint64_t uaddr; uint8_t perm; };
struct miss_tally { uint64_t served; uint64_t unmapped; uint64_t denied; int error; };
void serve_misses(int vhost_fd, int stop_fd, const struct miss_entry *table, size_t count,
                  int64_t *timings, size_t capacity, struct miss_tally *tally);
"""

C_SOURCE = r"""
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <linux/vhost.h>

struct miss_entry { uint64_t iova; uint64_t size; uint64_t uaddr; uint8_t perm; };
struct miss_tally { uint64_t served; uint64_t unmapped; uint64_t denied; int error; };

static int64_t now_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

/* The entry holding iova in a table sorted by iova, or NULL. */
static const struct miss_entry *covering(const struct miss_entry *table, size_t count, uint64_t iova)
{
    size_t low = 0, high = count;
    while (low < high) {  /* the first entry starting after iova ends up at low */
        size_t middle = low + (high - low) / 2;
        if (table[middle].iova <= iova)
            low = middle + 1;
        else
            high = middle;
    }
    if (low == 0 || iova - table[low - 1].iova >= table[low - 1].size)
        return NULL;
    return &table[low - 1];
}

/* Answer MISSes on vhost_fd (non-blocking, IOTLB_MSG_V2 acked) until stop_fd is readable. */
void serve_misses(int vhost_fd, int stop_fd, const struct miss_entry *table, size_t count,
                  int64_t *timings, size_t capacity, struct miss_tally *tally)
{
    struct pollfd fds[2] = {{.fd = vhost_fd, .events = POLLIN}, {.fd = stop_fd, .events = POLLIN}};
    struct vhost_msg_v2 miss, update = {.type = VHOST_IOTLB_MSG_V2};
    for (;;) {
        ssize_t got = read(vhost_fd, &miss, sizeof miss);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN) {
                tally->error = errno;
                return;
            }
            if (poll(fds, 2, -1) < 0 && errno != EINTR) {
                tally->error = errno;
                return;
            }
            if (fds[1].revents)
                return;
            continue;
        }
        int64_t started = now_ns();
        if (got != sizeof miss || miss.type != VHOST_IOTLB_MSG_V2 || miss.iotlb.type != VHOST_IOTLB_MISS) {
            tally->error = EPROTO;
            return;
        }
        const struct miss_entry *entry = covering(table, count, miss.iotlb.iova);
        if (entry == NULL) {
            tally->unmapped++;
            continue;
        }
        if (miss.iotlb.perm & ~entry->perm) {
            tally->denied++;
            continue;
        }
        update.iotlb.iova = entry->iova;
        update.iotlb.size = entry->size;
        update.iotlb.uaddr = entry->uaddr;
        update.iotlb.perm = entry->perm;
        update.iotlb.type = VHOST_IOTLB_UPDATE;
        if (write(vhost_fd, &update, sizeof update) != sizeof update) {
            tally->error = errno;
            return;
        }
        if (tally->served < capacity)
            timings[tally->served] = now_ns() - started;
        tally->served++;
    }
}
"""


@dataclass(frozen=True)
class StaticDomain:
    """What MissServer answers from: a map, here never swapped."""

    map: AddressMap


@dataclass
class Served:
    """One server's run on one device, warm-up left out."""

    served: int
    unanswered: int  # unmapped or denied: none expected
    phases_s: list[float]  # each round's kick to its last frame used
    service_us: dict  # p50, p99, max and count (service_percentiles)
    timings_ns: list[int] | None  # every service time, where the bench can read them (not in the daemon)

    @classmethod
    def timed(cls, timings_ns: list[int], served: int, unanswered: int, phases_s: list[float]) -> Served:
        return cls(served, unanswered, phases_s, service_percentiles(timings_ns), timings_ns)


@dataclass(frozen=True)
class Workload:
    memory: MemoryRegion
    domain: AddressMap
    ring_mapping: Mapping
    buffers: list[Mapping]
    buffer_span: tuple[int, int]  # (iova, size): what each round's INVALIDATE revokes
    tap: Tap
    rounds: int


def workload(stack: ExitStack, rounds: int) -> Workload:
    layout = RingLayout(FRAMES)
    ring_pages = -(-layout.size // PAGE_SIZE)
    memory = stack.enter_context(MemoryRegion((ring_pages + FRAMES) * PAGE_SIZE, "bench-misses"))
    ring_mapping = Mapping(RING_IOVA, ring_pages * PAGE_SIZE, memory, 0, Access.RW)
    header = bytes(VNET_HDR_V1)
    buffers = []
    for number in range(FRAMES):
        offset = (ring_pages + number) * PAGE_SIZE
        payload = struct.pack("<I", number).ljust(FRAME - 14, b"\0")
        frame = header + BROADCAST + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ETHERTYPE_EXPERIMENTAL) + payload
        memory.view[offset:offset + len(frame)] = frame
        # Neighbours differ in permission: the map keeps one entry, and the device one miss, per page.
        perm = Access.RO if number % 2 else Access.RW
        buffers.append(Mapping(BUFFER_IOVA + number * PAGE_SIZE, PAGE_SIZE, memory, offset, perm))
    domain = AddressMap([ring_mapping, *buffers])
    if len(domain) != FRAMES + 1:
        raise RuntimeError(f"the domain merged buffers: {len(domain)} entries for {FRAMES + 1} mappings")
    tap = stack.enter_context(tap_device(f"vdpadmiss{os.getpid() % 1000}"))
    return Workload(memory, domain, ring_mapping, buffers, (BUFFER_IOVA, FRAMES * PAGE_SIZE), tap, rounds)


@dataclass(frozen=True)
class TxQueue:
    ring: SplitRing
    memory: memoryview  # the ring's bytes
    kick: EventFd
    call: EventFd

    def wake_at(self, used_idx: int) -> None:
        """Ask for the call only once the used index reaches `used_idx` (EVENT_IDX's used_event, after the
        available ring): one wake-up a round, not one per frame, keeps the driver off the vCPUs the servers need."""
        layout = self.ring.layout
        U16.pack_into(self.memory, layout.avail + 4 + 2 * layout.num, (used_idx - 1) & 0xFFFF)


@contextmanager
def tx_queue(work: Workload) -> Iterator[TxQueue]:
    """The driver's TX ring, laid afresh over the workload's ring pages, and its kick and call eventfds."""
    with ExitStack() as stack:
        view = work.memory.view[:work.ring_mapping.size]
        stack.callback(view.release)  # the region cannot close under a view
        kick = stack.enter_context(EventFd("kick"))
        call = stack.enter_context(EventFd("call"))
        yield TxQueue(SplitRing(view, FRAMES), view, kick, call)


def set_tx_ring(dev: VhostNet | SessionDevice, queue: TxQueue) -> None:
    """The TX ring's size, addresses (IOVAs), base and eventfds: the same calls in-process and through a session."""
    layout = queue.ring.layout
    dev.set_vring_num(TX, FRAMES)
    dev.set_vring_addr(TX, VringAddr(desc=RING_IOVA + layout.desc, avail=RING_IOVA + layout.avail,
                                     used=RING_IOVA + layout.used))
    dev.set_vring_base(TX, 0)
    dev.set_vring_kick(TX, queue.kick.fileno())
    dev.set_vring_call(TX, queue.call.fileno())


@contextmanager
def vhost_net_tx(work: Workload) -> Iterator[tuple[VhostNet, TxQueue]]:
    """A fresh vhost-net device in this process translating through its IOTLB, its TX ring set up and the tap
    attached."""
    with ExitStack() as stack:
        queue = stack.enter_context(tx_queue(work))
        dev = stack.enter_context(VhostNet(VHOST_NET))
        dev.set_owner()
        dev.set_backend_features(BackendFeature.IOTLB_MSG_V2)
        dev.set_features(FEATURES)
        dev.set_mem_table([])  # vhost wants a table before a backend, even when its IOTLB translates
        set_tx_ring(dev, queue)
        # Attaching the backend writes the used ring, and vhost fails there rather than wait on a miss.
        ring_map = work.ring_mapping
        dev.write_iotlb(IotlbMessage(MessageType.UPDATE, ring_map.iova, ring_map.size, ring_map.uaddr, ring_map.perm))
        dev.set_backend(TX, work.tap.fd)
        stack.callback(dev.set_backend, TX, None)
        yield dev, queue


def drive(queue: TxQueue, rounds: int, invalidate: Callable[[], None]) -> list[float]:
    """`rounds` rounds of FRAMES frames, each buffer translated afresh: the seconds from each kick to its
    last frame used."""
    buffers = [Buffer(BUFFER_IOVA + number * PAGE_SIZE, VNET_HDR_V1 + FRAME) for number in range(FRAMES)]
    ring = queue.ring
    phases = []
    for _ in range(rounds):
        for buffer in buffers:
            ring.add([buffer])
        queue.wake_at(ring.avail_idx)
        start = time.perf_counter()
        queue.kick.write()
        done = 0
        while done < FRAMES:
            if not queue.call.wait(ROUND_TIMEOUT_S):
                raise TimeoutError(f"{done} of {FRAMES} frames used after {ROUND_TIMEOUT_S} s")
            queue.call.read()
            done += len(ring.reap())
        phases.append(time.perf_counter() - start)
        invalidate()
    return phases


def run_c_loop(c_loop, work: Workload) -> Served:
    ffi, lib = c_loop
    table = ffi.new("struct miss_entry[]", [{"iova": m.iova, "size": m.size, "uaddr": m.uaddr, "perm": int(m.perm)}
                                            for m in work.domain])
    capacity = (work.rounds + 1) * FRAMES
    timings = ffi.new("int64_t[]", capacity)
    tally = ffi.new("struct miss_tally *")
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
    with vhost_net_tx(work) as (dev, queue), ExitStack() as stack:
        stack.callback(os.close, stop_r)
        stack.callback(os.close, stop_w)
        span = IotlbMessage(MessageType.INVALIDATE, *work.buffer_span)
        fd = stack.enter_context(dev._owned.use())
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        thread = threading.Thread(target=lib.serve_misses, name="c-loop",
                                  args=(fd, stop_r, table, len(table), timings, capacity, tally))
        thread.start()
        try:
            drive(queue, 1, lambda: dev.write_iotlb(span))
            warm = tally.served
            phases = drive(queue, work.rounds, lambda: dev.write_iotlb(span))
        finally:
            os.write(stop_w, b"x")
            thread.join()
    if tally.error:
        raise OSError(tally.error, f"the C miss loop stopped: {os.strerror(tally.error)}")
    served = tally.served - warm
    return Served.timed(list(timings[warm:min(tally.served, capacity)]), served, tally.unmapped + tally.denied, phases)


def run_miss_server(work: Workload) -> Served:
    with vhost_net_tx(work) as (dev, queue):
        server = MissServer(dev, StaticDomain(work.domain), label="bench")
        server.start()
        try:
            revoke = [work.buffer_span]
            drive(queue, 1, lambda: server.invalidate(revoke))
            warm = server.counters.served
            phases = drive(queue, work.rounds, lambda: server.invalidate(revoke))
            served = server.counters.served - warm
            timings = server.service_times()[-served:] if served else []
        finally:
            server.retire(invalidate=False)  # the device closes next
    counters = server.counters
    return Served.timed(timings, served, counters.unmapped + counters.denied, phases)


@dataclass(frozen=True)
class DaemonDomain:
    client: Client
    domain: RemoteDomain
    remap: list[dict]  # a round's commit: the buffers unmapped, and mapped again as they were


@contextmanager
def daemon_domain(work: Workload) -> Iterator[DaemonDomain]:
    """`vdpad serve` in a process of its own, and a domain there that maps what the workload's map does, over
    the same memory (registered: the daemon maps the memfd)."""
    with running_daemon(env=DAEMON_LOG) as daemon, daemon.client() as client, \
            client.create_domain(DOMAIN) as domain:
        domain.register(work.memory, MEMORY)
        ring = work.ring_mapping
        buffers = [domain.map(m.iova, MEMORY, m.offset, m.size, m.perm) for m in work.buffers]
        domain.commit([domain.map(ring.iova, MEMORY, ring.offset, ring.size, ring.perm), *buffers])
        entries = domain.show()["entries"]
        if entries != len(work.domain):
            raise RuntimeError(f"the daemon's domain has {entries} entries for the workload's {len(work.domain)}")
        yield DaemonDomain(client, domain, [domain.unmap(*work.buffer_span), *buffers])


def start_session(device: SessionDevice, queue: TxQueue) -> None:
    """The virtio status walk through the session; DRIVER_OK attaches the tap (the daemon translates the used
    ring first)."""
    status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
    device.set_status(status)
    device.set_features(FEATURES)
    status |= DeviceStatus.FEATURES_OK
    device.set_status(status)
    set_tx_ring(device, queue)
    device.set_vring_enable(TX, True)
    device.set_status(status | DeviceStatus.DRIVER_OK)


def run_daemon(rig: DaemonDomain, work: Workload) -> Served:
    domain = rig.domain

    def invalidate() -> None:
        if (invalidated := domain.commit(rig.remap)["invalidated"]) != 1:
            raise RuntimeError(f"the round's commit sent {invalidated} INVALIDATEs, not one")

    with tx_queue(work) as queue, rig.client.open_vhost_net(work.tap.fd) as session:
        domain.attach(session)
        start_session(session.device, queue)
        drive(queue, 1, invalidate)
        # A fresh miss server, whose service times are the counted rounds' alone (the device forgets every
        # translation, the ring's too: one miss more in the first counted round).
        domain.detach(session)
        domain.attach(session)
        phases = drive(queue, work.rounds, invalidate)
        (record,) = [s for s in rig.client.sessions() if s["session"] == session.number]
    misses = record["misses"]
    return Served(misses["served"], misses["unmapped"] + misses["denied"], phases, misses["service_us"], None)


def summarise(runs: list[Served]) -> dict:
    each = [{"served": run.served, "unanswered": run.unanswered, "serving_s": sum(run.phases_s),
             "misses_per_s": run.served / sum(run.phases_s),
             "p50_us": run.service_us["p50"], "p99_us": run.service_us["p99"], "max_us": run.service_us["max"]}
            for run in runs]
    figures = {
        "served": statistics.median(r["served"] for r in each),
        "served_total": sum(r["served"] for r in each),
        "p50_us": statistics.median(r["p50_us"] for r in each),
        "p99_us": statistics.median(r["p99_us"] for r in each),
        "misses_per_s": statistics.median(r["misses_per_s"] for r in each),
        "max_us": max(r["max_us"] for r in each),
        "runs": each,
    }
    pooled = [ns for run in runs for ns in run.timings_ns or ()]
    if pooled:
        # Every repetition's service times together, as percentiles 1..99: the distribution to plot.
        figures["percentiles_us"] = [round(value / 1e3, 2) for value in
                                     statistics.quantiles(pooled, n=100, method="inclusive")]
        figures["min_us"] = min(pooled) / 1e3
    return figures


def measure(repetitions: int, rounds: int) -> dict:
    subprocess.run(["modprobe", "vhost_net"], check=True)
    with ExitStack() as stack:
        work = workload(stack, rounds)
        build = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vdpad-misses-")))
        c_loop = compile_c("_vdpad_bench_misses", C_DECLARATIONS, C_SOURCE, build)
        daemon = stack.enter_context(daemon_domain(work))
        run = {"c_loop": lambda: run_c_loop(c_loop, work), "miss_server": lambda: run_miss_server(work),
               "daemon": lambda: run_daemon(daemon, work)}
        runs: dict[str, list[Served]] = {server: [] for server in SERVERS}
        for repetition in range(repetitions):
            turn = repetition % len(SERVERS)
            for server in SERVERS[turn:] + SERVERS[:turn]:
                served = run[server]()
                if served.unanswered:
                    raise RuntimeError(f"{server} left {served.unanswered} misses unanswered: the map covers them all")
                runs[server].append(served)
    return {server: summarise(server_runs) for server, server_runs in runs.items()}


def ratios(server: dict, c_loop: dict) -> dict:
    """`server` against the C loop, and whether the targets are met."""
    p50 = server["p50_us"] / c_loop["p50_us"]
    rate = server["misses_per_s"] / c_loop["misses_per_s"]
    return {"p50_ratio": {"ratio": p50, "target": P50_RATIO_TARGET, "met": p50 <= P50_RATIO_TARGET},
            "throughput_ratio": {"ratio": rate, "target": RATE_RATIO_TARGET, "met": rate >= RATE_RATIO_TARGET}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.misses", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=os.environ.get("VDPAD_VM_OUT"))
    parser.add_argument("--repetitions", type=int, default=9, help="a multiple of 3: each server first as often")
    parser.add_argument("--rounds", type=int, default=16, help="counted rounds per device, after one warm-up")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out is needed outside the VM harness (no $VDPAD_VM_OUT)")
    import vdpad
    servers = measure(args.repetitions, args.rounds)
    report = {
        "benchmark": "device-IOTLB misses on vhost-net (ACCESS_PLATFORM, tap backend): the daemon and MissServer "
                     "in-process vs a C loop",
        "command": "make bench-misses",
        "vdpad": str(Path(vdpad.__file__).parent),
        "kernel": platform.release(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "statistic": "median of repetitions",
        "daemon_log_level": DAEMON_LOG["VDPAD_LOG"],
        "workload": {"frames_per_round": FRAMES, "rounds": args.rounds, "warm_up_rounds": 1,
                     "repetitions": args.repetitions, "buffer_pages": FRAMES, "domain_entries": FRAMES + 1},
        "servers": servers,
        # The targets are the daemon's; MissServer in-process is held to the same, for reference.
        "targets": {server: ratios(servers[server], servers["c_loop"]) for server in ("daemon", "miss_server")},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "misses.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({server: {key: round(figures[key], 1) for key in ("served", "p50_us", "p99_us", "misses_per_s")}
                      for server, figures in servers.items()}), file=sys.stderr)
    print(json.dumps(report["targets"], indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
