"""What the IOTLB engine's own logic costs per commit, on the host (`make bench-host`).

No kernel and no VM: a commit runs through `DeviceIotlb` against
`BenchDevice`, a benchmark stand-in for `VhostVdpa` that accepts every
message and keeps nothing, so what is timed is the engine's work: the
operation on the snapshot, its replay onto the view, the plan against the
units, the booking of the units message by message, the trace hook.

    python -m tests.bench.engine [--out docs/bench]

Writes engine.json. Besides the figures it holds references measured in the
same run, which say how fast this machine is: a plain `bisect` lookup in a
list of 100k starts, the cost of rebuilding a whole map for each
operation (what `AddressMap.mapped` did before the B+tree), at 1k entries,
and a plain copy of a 100k-entry miss table (what packing one after a change
is measured against).
tests/bench/plot_engine.py draws it.
"""

from __future__ import annotations

import argparse
import bisect
import json
import platform
import random
import sys
from array import array
from collections.abc import Callable
from pathlib import Path

from tests.bench.common import timed
from vdpad.device import MessageType
from vdpad.device.flags import BackendFeature, DeviceStatus
from vdpad.device.iotlb_msg import IotlbMessage
from vdpad.device.vdpa import IovaRange
from vdpad.iotlb import PAGE_SIZE, AddressMap, DeviceIotlb, Mapping, MemoryRegion, Perm
from vdpad.iotlb.engine import BASE_FEATURES
from vdpad.iotlb.plan import plan
from vdpad.mgmt.parent import MapKind

P = PAGE_SIZE
TARGETS = {"grow_10k_s": 1.0, "lookup_100k_us": 5.0, "plan_10k_ms": 10.0}
SIZES = (1_000, 10_000, 100_000)  # map sizes at which one commit is timed
COMMITS = 1_000  # timed one-operation commits at each size


class BenchDevice:
    """Benchmark stand-in for VhostVdpa: the calls DeviceIotlb makes, every IOTLB message accepted."""

    path = "bench-stand-in"
    released = False
    suspended = False

    def __init__(self) -> None:
        self.acked_backend_features = BackendFeature(0)
        self.written: dict[MessageType, int] = dict.fromkeys(MessageType, 0)

    def get_backend_features(self) -> BackendFeature:
        return BASE_FEATURES | BackendFeature.IOTLB_PERSIST

    def set_backend_features(self, features: BackendFeature) -> None:
        self.acked_backend_features = BackendFeature(features)

    def get_iova_range(self) -> IovaRange:
        return IovaRange(0, (1 << 64) - 1)

    def get_as_num(self) -> int:
        return 1

    def get_group_num(self) -> int:
        return 1

    def get_status(self) -> DeviceStatus:
        return DeviceStatus(0)

    def write_iotlb(self, message: IotlbMessage) -> None:
        self.written[message.type] += 1

    def write_iotlb_ranges(self, asid: int, invalidate: array, update: array, *, begin: bool = False,
                           end: bool = False) -> int:
        self.written[MessageType.BATCH_BEGIN] += begin
        self.written[MessageType.INVALIDATE] += len(invalidate) // 2
        self.written[MessageType.UPDATE] += len(update) // 4
        self.written[MessageType.BATCH_END] += end
        return begin + len(invalidate) // 2 + len(update) // 4 + end


def best_of(runs: int, work: Callable[[], object]) -> float:
    return min(timed(work) for _ in range(runs))


def engine() -> DeviceIotlb:
    return DeviceIotlb(BenchDevice(), map_kind=MapKind.BATCHED)  # type: ignore[arg-type]


def grow(region: MemoryRegion, count: int, *, contiguous: bool) -> float:
    """`count` one-map transactions from an empty map: apart (one entry each) or continuing each other."""
    iotlb = engine()
    stride = 1 if contiguous else 2  # a hole between pages keeps them separate entries

    def run() -> None:
        for page in range(count):
            iotlb.map(0, page * stride * P, region, page * P, P)

    seconds = timed(run)
    view = iotlb.space(0)
    assert len(view.units) == count and len(view) == (1 if contiguous else count)
    return seconds


def commit_at(region: MemoryRegion, size: int) -> dict:
    """One-operation commits (a map, then its unmap) on a map of `size` separate entries."""
    iotlb = engine()
    with iotlb.transaction(0) as tx:  # built in one commit: one UPDATE per entry
        for page in range(size):
            tx.map(2 * page * P, region, page * P, P)
    free = [2 * page + 1 for page in random.Random(size).sample(range(size), COMMITS)]  # the holes between

    def run() -> None:
        for page in free:
            iotlb.map(0, page * P, region, 0, P, Perm.RO)
            iotlb.unmap(0, page * P, P)

    seconds = best_of(3, run)
    assert len(iotlb.space(0)) == size
    return {"entries": size, "commit_us": seconds / (2 * COMMITS) * 1e6}


def scattered(region: MemoryRegion, count: int, shift: int = 0) -> AddressMap:
    return AddressMap(Mapping(2 * page * P, P, region, ((page + shift) % count) * P, Perm.RW)
                      for page in range(count))


def lookups(region: MemoryRegion, count: int) -> dict:
    amap = scattered(region, count)
    probes = [random.Random(1).randrange(0, 2 * count) * P for _ in range(10_000)]
    seconds = best_of(5, lambda: [amap.lookup(iova) for iova in probes])
    starts = [m.iova for m in amap]
    entries = list(amap)

    def reference(iova: int) -> Mapping | None:  # a sorted list and bisect: what the tuple map did
        index = bisect.bisect_right(starts, iova) - 1
        return entries[index] if index >= 0 and iova < entries[index].end else None

    reference_seconds = best_of(5, lambda: [reference(iova) for iova in probes])
    return {"entries": count, "lookup_us": seconds / len(probes) * 1e6,
            "bisect_reference_us": reference_seconds / len(probes) * 1e6}


def plans(region: MemoryRegion, count: int) -> dict:
    """The full plan between two maps of `count` entries: every other entry moved to other memory."""
    before = scattered(region, count)
    units = plan((), before).units
    after = AddressMap(m if i % 2 else Mapping(m.iova, m.size, m.region, (m.offset + P) % region.size, m.perm)
                       for i, m in enumerate(before))
    seconds = best_of(5, lambda: plan(units, after))
    work = plan(units, after)
    return {"entries": count, "plan_ms": seconds * 1e3, "invalidate": len(work.invalidate), "update": len(work.update)}


def miss_tables(region: MemoryRegion, count: int, changes: int = 20) -> dict:
    """The miss table of a `count`-entry domain (MappingTree.update_quads), packed whole and then after each of
    `changes` one-mapping changes (what a miss server loads after a commit), against a plain copy of its
    bytes (the memcpy no packing can beat)."""
    amap = scattered(region, count)
    first = timed(amap.tree.update_quads)
    quads = amap.tree.update_quads()
    maps = [amap := amap.mapped(Mapping((2 * page + 1) * P, P, region, 0, Perm.RO)) for page in range(changes)]
    after = timed(lambda: [m.tree.update_quads() for m in maps]) / changes
    copy = best_of(5, lambda: bytes(bytearray(quads)))
    return {"entries": count, "first_ms": first * 1e3, "after_change_ms": after * 1e3, "bytes": len(quads),
            "copy_reference_ms": copy * 1e3}


def rebuild_reference(region: MemoryRegion, count: int) -> float:
    """Growing a map to `count` entries by rebuilding it whole for each map (the tuple map's cost)."""
    def run() -> None:
        amap = AddressMap()
        for page in range(count):
            amap = AddressMap((*amap, Mapping(2 * page * P, P, region, page * P, Perm.RW)))

    return timed(run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = parser.parse_args(argv)
    with MemoryRegion(max(SIZES) * P, "bench") as region:
        grow_s = min(grow(region, 10_000, contiguous=False) for _ in range(3))
        grow_contiguous_s = min(grow(region, 10_000, contiguous=True) for _ in range(3))
        commits = [commit_at(region, size) for size in SIZES]
        lookup = lookups(region, 100_000)
        planned = plans(region, 10_000)
        table = miss_tables(region, 100_000)
        rebuild_1k_s = rebuild_reference(region, 1_000)
    figures = {
        "grow_10k_s": grow_s,
        "grow_10k_contiguous_s": grow_contiguous_s,
        "lookup_100k_us": lookup["lookup_us"],
        "plan_10k_ms": planned["plan_ms"],
    }
    report = {
        "what": "IOTLB engine logic per commit, host only (tests/bench/engine.py, BenchDevice stand-in)",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "figures": figures,
        "targets": {name: {"limit": limit, "measured": figures[name], "met": figures[name] <= limit}
                    for name, limit in TARGETS.items()},
        "commit_by_size": commits,
        "plan": planned,
        "miss_table": table,
        "references": {
            "bisect_lookup_100k_us": lookup["bisect_reference_us"],
            "rebuild_per_op_grow_1k_s": rebuild_1k_s,
            "lookup_vs_bisect": lookup["lookup_us"] / lookup["bisect_reference_us"],
            "grow_10k_vs_rebuild_grow_1k": grow_s / rebuild_1k_s,
            "miss_table_after_change_vs_copy": table["after_change_ms"] / table["copy_reference_ms"],
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine.json").write_text(json.dumps(report, indent=2) + "\n")
    json.dump(report["figures"] | {"met": all(t["met"] for t in report["targets"].values())}, sys.stderr, indent=2)
    print(file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
