"""Migration downtime through the daemon (run inside the VM: `make bench-migration`).

Two vdpasim_net devices under one `vdpad serve` (at its default log level,
warning), one client, one driver: the device is migrated from one to the
other and back, over and over (`migrate_to`: `session.migrate`, the save and
the load in one request; the driver's `carry_on`). Downtime is what the driver sees: from the save (the source's
SUSPEND) to the first frame completed by the destination (one frame sent on
TX and received back on RX), timed the same way for both ways of mapping the
destination:

- early: the destination's maps are committed before the switch-over (one
  `iotlb.commit` of the whole memory, timed on its own: `early_map`), so the
  load finds them in place;
- switch_over: the destination has nothing mapped and the load commits the
  maps, inside the downtime (in PA mode, pinning every page there).

Before every switch-over the destination (the previous source: suspended,
its maps kept) is reset and unmapped (untimed), so both ways start from the
same state; a pause lets the kernel's unpinning settle. The two ways
alternate within each repetition (the order flipping every repetition), so
host load falls on both alike. For each mode (VA: vdpa_sim's default; PA:
use_va=0, vhost-vdpa pins every mapped page) and size: every run, the median
and quartiles, and the median of each phase (migrate: the save and load in one request; frame).

    python -m tests.bench.migration [--out DIR] [--repetitions N] [--sizes-mib 64,256,1024] [--modes va,pa]

Writes DIR/migration.json (default DIR: $VDPAD_VM_OUT); tests/bench/plot_migration.py draws it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tests.bench.common import timed
from tests.service import running_daemon
from tests.sim import frames, iova_far_from_us, sim_mode, vdpa_device
from vdpad.iotlb import MemoryRegion
from vdpad.virtio import DmaArena, NetDriver

MIB = 1 << 20
DRIVER_WINDOW = MIB  # the driver's rings and buffers: the first MiB of the memory
SETTLE_S = 0.2  # pause before each timed step: the previous step's kernel work (unpinning) is done
FLAT_LIMIT = 1.2  # early mapping: downtime at the largest size over the smallest, at most
PA_SPEEDUP_TARGET = 10.0  # PA mode, largest size: downtime mapped at the switch-over over mapped early, at least
DAEMON_LOG = {"VDPAD_LOG": "warning"}  # the daemon's default: no debug event per message
MAPPINGS = ("early", "switch_over")


def _stats(seconds: list[float]) -> dict[str, Any]:
    ms = [1000 * s for s in seconds]
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0], 0, ms[0])
    return {"median_ms": statistics.median(ms), "quartiles_ms": [q1, q3], "min_ms": min(ms), "max_ms": max(ms),
            "runs_ms": ms}


def measure(mode: str, sizes_mib: list[int], repetitions: int) -> list[dict]:
    results = []
    tag = os.getpid() % 1000
    with sim_mode(use_va=mode == "va"), running_daemon(env=DAEMON_LOG) as daemon, daemon.client() as client, \
            vdpa_device(f"ma{tag}", "vdpasim_net"), vdpa_device(f"mb{tag}", "vdpasim_net"):
        for size_mib in sizes_mib:
            size = size_mib * MIB
            with MemoryRegion(size, "ram") as ram:
                sessions = [client.open_session(f"ma{tag}"), client.open_session(f"mb{tag}")]
                iova = iova_far_from_us(sessions[0].iova_range, size)
                for session in sessions:
                    session.register(ram)
                sessions[0].commit([sessions[0].map(iova, ram, 0, size)])  # the running source's memory
                mapped = {id(sessions[0])}
                arena = DmaArena(ram, iova, size=DRIVER_WINDOW)
                net = NetDriver(sessions[0].device, arena)
                net.start()
                frame = frames(1, seed=size_mib)
                assert net.exchange(frame) == frame
                runs: dict[str, list[dict]] = {mapping: [] for mapping in MAPPINGS}
                for repetition in range(repetitions):
                    order = MAPPINGS if repetition % 2 == 0 else MAPPINGS[::-1]
                    for mapping in order:
                        source, destination = sessions
                        destination.reset()  # it was the source before: suspended, its maps kept
                        if id(destination) in mapped:
                            destination.commit([destination.unmap(iova, size)])
                            mapped.discard(id(destination))
                        net.bind(destination.device)
                        run: dict[str, float] = {}
                        if mapping == "early":
                            time.sleep(SETTLE_S)
                            run["early_map"] = timed(
                                lambda: destination.commit([destination.map(iova, ram, 0, size)]))
                        time.sleep(SETTLE_S)

                        def switch() -> None:
                            start = time.perf_counter()
                            source.migrate_to(destination)  # one request: save here, load there
                            migrated = time.perf_counter()
                            net.carry_on(destination.device)
                            assert net.exchange(frame) == frame
                            run.update(migrate=migrated - start, frame=time.perf_counter() - migrated)

                        run["downtime"] = timed(switch)
                        mapped.add(id(destination))
                        runs[mapping].append(run)
                        sessions.reverse()
                pinned = daemon.status("VmPin")
                for mapping in MAPPINGS:
                    entry: dict[str, Any] = {"mode": mode, "size_mib": size_mib, "mapping": mapping,
                                             **_stats([r["downtime"] for r in runs[mapping]])}
                    for phase in ("migrate", "frame"):
                        entry[f"{phase}_median_ms"] = 1000 * statistics.median(r[phase] for r in runs[mapping])
                    if mapping == "early":
                        entry["early_map"] = _stats([r["early_map"] for r in runs[mapping]])
                    entry["pinned_by_daemon_after"] = pinned
                    results.append(entry)
                    print(f"{mode} {size_mib:5d} MiB {mapping:11}: downtime median {entry['median_ms']:8.1f} ms "
                          f"(migrate {entry['migrate_median_ms']:.1f}, frame {entry['frame_median_ms']:.1f})"
                          + (f"; early map {entry['early_map']['median_ms']:.1f} ms" if mapping == "early" else ""),
                          file=sys.stderr, flush=True)
                net.close()
                arena.reset()
                for session in sessions:
                    session.close()
    return results


def targets(results: list[dict], sizes_mib: list[int]) -> dict[str, Any]:
    def median(mode: str, mib: int, mapping: str) -> float:
        return next(r["median_ms"] for r in results if (r["mode"], r["size_mib"], r["mapping"]) == (mode, mib, mapping))

    small, large = min(sizes_mib), max(sizes_mib)
    out: dict[str, Any] = {}
    for mode in sorted({r["mode"] for r in results}):
        ratio = median(mode, large, "early") / median(mode, small, "early")
        out[f"{mode}_early_{large}_vs_{small}_mib"] = {"ratio": ratio, "limit": FLAT_LIMIT, "met": ratio <= FLAT_LIMIT}
        speedup = median(mode, large, "switch_over") / median(mode, large, "early")
        entry: dict[str, Any] = {"ratio": speedup}
        if mode == "pa":  # where mapping pins pages, mapping early must pay off
            entry.update(target=PA_SPEEDUP_TARGET, met=speedup >= PA_SPEEDUP_TARGET)
        out[f"{mode}_early_speedup_at_{large}_mib"] = entry
    return out


def _mem_total_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.migration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=os.environ.get("VDPAD_VM_OUT"))
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--sizes-mib", default="64,256,1024")
    parser.add_argument("--modes", default="va,pa")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out is needed outside the VM harness (no $VDPAD_VM_OUT)")
    if args.repetitions < 1:
        parser.error("--repetitions must be at least 1")
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    results = []
    for mode in args.modes.split(","):
        results += measure(mode, sizes, args.repetitions)
    report = {
        "benchmark": "migration downtime through the daemon, vdpasim_net: the source's SUSPEND (session.migrate: "
                     "save, then load) -> carry_on -> first frame back on the destination, its maps committed "
                     "early or by the load at the switch-over",
        "command": "make bench-migration",
        "repetitions": args.repetitions,
        "statistic": "client-side wall time, milliseconds; median, quartiles and every run",
        "kernel": platform.release(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "memory_total_mib": _mem_total_mib(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "daemon_log_level": DAEMON_LOG["VDPAD_LOG"], "settle_s": SETTLE_S,
        "modes": {"va": "vdpa_sim use_va=1 (default)", "pa": "vdpa_sim use_va=0: every map pins pages"},
        "mappings": {"early": "the destination's maps committed before the switch-over (early_map: that commit)",
                     "switch_over": "nothing mapped on the destination: the load commits the maps"},
        "results": results,
        "targets": targets(results, sizes),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "migration.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["targets"], indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
