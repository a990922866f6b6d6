"""Device restart time with and without IOTLB_PERSIST (run inside the VM: `make bench-restart`).

A restart is what live migration or recovery pays: SET_STATUS(0) through the
IOTLB engine (which replays every map when the kernel did not keep them),
feature negotiation and rings again up to DRIVER_OK, then one frame sent on
TX and received back on RX. Measured for 64 MiB, 256 MiB and 1 GiB of mapped
memory, in vdpa_sim's VA mode and in PA mode (use_va=0, where mapping pins
every page). All devices of a mode exist together (a persistent and a
replaying one over the same memory for each size) and every repetition
restarts each of them in a rotating order, so all see the same load; a short
pause before each timed restart lets the previous one's kernel work settle.

    python -m tests.bench.restart [--out DIR] [--repetitions N] [--sizes-mib 64,256,1024]

Writes DIR/restart.json (default DIR: $VDPAD_VM_OUT); tests/bench/plot.py draws it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tests.sim import frames, iova_far_from_us, sim_mode, vdpa_device
from vdpad.device import MessageType, VhostVdpa
from vdpad.iotlb import DeviceIotlb, MemoryRegion
from vdpad.virtio import DmaArena, NetDriver

DRIVER_WINDOW = 1 << 20  # each driver's rings and buffers: its own MiB at the start of the shared memory
MIB = 1 << 20
SETTLE_S = 0.2
PERSIST_FLAT_LIMIT = 1.2  # persistent restart at the largest size vs the smallest
PA_SPEEDUP_TARGET = 10.0  # replaying vs persistent restart at the largest size, PA mode


@dataclass
class Rig:
    persist: bool
    iotlb: DeviceIotlb
    net: NetDriver
    runs: list[dict[str, float]] = field(default_factory=list)
    messages: dict[str, int] = field(default_factory=dict)

    def restart(self, frame: bytes) -> None:
        """One timed restart, up to the frame coming back."""
        # Let the kernel finish what the previous restart left behind (unpinned
        # pages, the sim's worker) on the guest's two vCPUs before timing this one.
        time.sleep(SETTLE_S)
        gc.collect()
        gc.disable()
        try:
            with self.iotlb.record() as trace:
                started = time.perf_counter()
                self.iotlb.reset()
                reset = time.perf_counter()
                self.net.start()
                driver_ok = time.perf_counter()
                received = self.net.exchange([frame])
                done = time.perf_counter()
        finally:
            gc.enable()
        if received != [frame]:
            raise RuntimeError(f"restart of a {'persistent' if self.persist else 'replaying'} device: "
                               "the frame did not come back intact")
        self.runs.append({"reset_ms": (reset - started) * 1e3, "driver_ok_ms": (driver_ok - reset) * 1e3,
                          "first_frame_ms": (done - driver_ok) * 1e3, "total_ms": (done - started) * 1e3})
        self.messages = {kind.name: len(trace.messages(kind)) for kind in (MessageType.UPDATE, MessageType.INVALIDATE)}


def measure_mode(mode: str, sizes: list[int], repetitions: int) -> list[dict]:
    """Every (size, persist) device of one mode, alive together; each repetition restarts all of them."""
    with ExitStack() as stack:
        rigs: list[tuple[Rig, int, float]] = []
        for size in sizes:
            memory = stack.enter_context(MemoryRegion(size, f"bench-{size // MIB}M", populate=True))
            for number, persist in enumerate((True, False)):
                node = stack.enter_context(vdpa_device(f"b{mode}{size // MIB}{'kr'[number]}", "vdpasim_net"))
                dev = stack.enter_context(VhostVdpa(node))
                dev.set_owner()
                iotlb = DeviceIotlb(dev, persist=persist)
                if iotlb.persistent != persist:
                    raise RuntimeError(f"IOTLB_PERSIST {'not offered' if persist else 'acked anyway'} on {node}")
                iova = iova_far_from_us(iotlb.iova_range, size)  # inside what this device can map
                mapped = time.perf_counter()
                iotlb.map(0, iova, memory, 0, size)
                map_ms = (time.perf_counter() - mapped) * 1e3
                # Both devices map all of the memory; each driver keeps its rings in a MiB of its own.
                arena = stack.enter_context(DmaArena(memory, iova + number * DRIVER_WINDOW,
                                                     offset=number * DRIVER_WINDOW, size=DRIVER_WINDOW))
                net = stack.enter_context(NetDriver(dev, arena, queue_size=16))
                net.start()
                warm = frames(1, seed=number)
                if net.exchange(warm) != warm:
                    raise RuntimeError(f"{node}: no traffic before the first restart")
                rigs.append((Rig(persist, iotlb, net), size, map_ms))
        for repetition in range(repetitions):
            # Rotate the order: every device sees the others' after-effects and the host's load alike.
            turn = repetition % len(rigs)
            for rig, _, _ in rigs[turn:] + rigs[:turn]:
                rig.restart(frames(1, seed=100 + repetition)[0])
        results = []
        for rig, size, map_ms in rigs:
            totals = [run["total_ms"] for run in rig.runs]
            quartiles = statistics.quantiles(totals, n=4)
            results.append({
                "mode": mode, "memory_mib": size // MIB, "persist": rig.persist,
                "median_ms": statistics.median(totals), "min_ms": min(totals), "max_ms": max(totals),
                "quartiles_ms": [quartiles[0], quartiles[2]],
                "phases_median_ms": {phase: statistics.median(run[phase] for run in rig.runs)
                                     for phase in ("reset_ms", "driver_ok_ms", "first_frame_ms")},
                "messages_per_restart": rig.messages, "initial_map_ms": map_ms, "runs_ms": totals,
            })
            print(f"{mode} {size // MIB:5d} MiB persist={rig.persist!s:5}: median {results[-1]['median_ms']:9.2f} ms "
                  f"(min {min(totals):.2f}, max {max(totals):.2f}; first map {map_ms:.1f} ms; "
                  f"per restart {rig.messages})", file=sys.stderr, flush=True)
        return results


def verdict(results: list[dict], sizes: list[int]) -> dict:
    def median(mode: str, mib: int, persist: bool) -> float:
        return next(r["median_ms"] for r in results
                    if (r["mode"], r["memory_mib"], r["persist"]) == (mode, mib, persist))

    small, large = min(sizes) // MIB, max(sizes) // MIB
    out: dict = {}
    for mode in sorted({r["mode"] for r in results}):
        ratio = median(mode, large, True) / median(mode, small, True)
        out[f"{mode}_persist_{large}_vs_{small}_mib"] = {
            "ratio": ratio, "limit": PERSIST_FLAT_LIMIT, "met": ratio <= PERSIST_FLAT_LIMIT}
        speedup = median(mode, large, False) / median(mode, large, True)
        entry: dict = {"ratio": speedup}
        if mode == "pa":  # where mapping pins pages, keeping the maps must pay off
            entry.update(target=PA_SPEEDUP_TARGET, met=speedup >= PA_SPEEDUP_TARGET)
        out[f"{mode}_speedup_at_{large}_mib"] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.restart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=os.environ.get("VDPAD_VM_OUT"))
    parser.add_argument("--repetitions", type=int, default=31)
    parser.add_argument("--sizes-mib", default="64,256,1024")
    parser.add_argument("--modes", default="va,pa")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out is needed outside the VM harness (no $VDPAD_VM_OUT)")
    sizes = [int(s) * MIB for s in args.sizes_mib.split(",")]
    results = []
    for mode in args.modes.split(","):
        with sim_mode(use_va=mode == "va"):
            results += measure_mode(mode, sizes, args.repetitions)
    report = {
        "benchmark": "device restart: reset -> rings -> DRIVER_OK -> first frame back, vdpasim_net",
        "command": "make bench-restart",
        "repetitions": args.repetitions,
        "statistic": "median of repetitions, milliseconds",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory_total_mib": _mem_total_mib(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": results,
        "targets": verdict(results, sizes),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "restart.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["targets"], indent=2), file=sys.stderr)
    return 0


def _mem_total_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


if __name__ == "__main__":
    sys.exit(main())
