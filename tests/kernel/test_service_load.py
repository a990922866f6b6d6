"""Load: 32 concurrent clients for 60 s ($VDPAD_LOAD_SECONDS), 8 committing maps and unmaps on sessions
of their own, 24 reading status. No request is lost and the daemon's memory stays flat.

Clients are threads of this process: the daemon is the process under test, and a blocking client
spends its time waiting on the socket, so the GIL here does not throttle it.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import pytest

from tests.service import running_daemon
from tests.sim import iova_far_from_us, vdpa_device
from vdpad.iotlb import MemoryRegion

pytestmark = pytest.mark.kernel

SECONDS = float(os.environ.get("VDPAD_LOAD_SECONDS", 60))
COMMITTERS, READERS = 8, 24
WARM_UP = min(10.0, SECONDS / 4)
# What "flat" allows after the warm-up: allocator slack, not growth per request.
RSS_SLACK = 4 << 20


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    errors: list[str] = field(default_factory=list)


def test_32_clients_for_a_minute_lose_nothing_and_the_daemon_stays_flat(sim_modules):
    stop = threading.Event()
    tallies = [Tally() for _ in range(COMMITTERS + READERS)]
    with running_daemon(env={"VDPAD_LOG": "info"}) as daemon, ExitStack() as stack:
        names = [f"ld{os.getpid() % 1000}x{n}" for n in range(COMMITTERS)]
        for name in names:
            stack.enter_context(vdpa_device(name, "vdpasim_net"))

        def commit_loop(tally: Tally, device: str) -> None:
            with daemon.client() as client, MemoryRegion(64 << 10, "load") as ram:
                session = client.open_session(device)
                session.register(ram)
                iova = iova_far_from_us(session.iova_range, ram.size)
                while not stop.is_set():
                    for op in (session.map(iova, ram, 0, ram.size), session.unmap(iova, ram.size)):
                        tally.sent += 1
                        try:
                            session.commit([op])
                        except Exception as error:  # noqa: BLE001 - counted, and the test fails on it
                            tally.errors.append(repr(error))
                        else:
                            tally.answered += 1
                session.close()

        def status_loop(tally: Tally) -> None:
            with daemon.client() as client:
                while not stop.is_set():
                    tally.sent += 1
                    try:
                        client.status()
                    except Exception as error:  # noqa: BLE001
                        tally.errors.append(repr(error))
                    else:
                        tally.answered += 1

        threads = [threading.Thread(target=commit_loop, args=(tallies[n], names[n])) for n in range(COMMITTERS)]
        threads += [threading.Thread(target=status_loop, args=(tallies[COMMITTERS + n],)) for n in range(READERS)]
        with daemon.client() as client:
            requests_before = client.status()["counters"]["requests"]
        for thread in threads:
            thread.start()
        rss: list[int] = []
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < SECONDS:
            time.sleep(1)
            rss.append(daemon.status("VmRSS"))
        stop.set()
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads)

        errors = [e for t in tallies for e in t.errors]
        assert errors == []
        sent, answered = sum(t.sent for t in tallies), sum(t.answered for t in tallies)
        assert sent == answered and all(t.answered > 0 for t in tallies)
        with daemon.client() as client:
            status = client.status()
        # The daemon counted every one: ours, each session's open, registration and close, and this status.
        assert status["counters"]["requests"] - requests_before == answered + COMMITTERS * 3 + 1
        assert status["sessions"] == 0 and status["counters"]["errors"] == 0
        warm = rss[int(WARM_UP)]
        print(f"{answered} requests in {elapsed:.0f} s ({answered / elapsed:.0f}/s); "
              f"RSS {rss[0] >> 10} KiB at 1 s, {warm >> 10} KiB after warm-up, {rss[-1] >> 10} KiB at the end, "
              f"max {max(rss) >> 10} KiB")
        assert max(rss[int(WARM_UP):]) - warm <= RSS_SLACK, rss
