"""What an IOTLB message costs through vdpad, against a bare C write loop (run inside the VM: `make bench-messages`).

On one vdpasim_net device (VA mode, set_map), in one run:

- the reference: BATCH_BEGIN, 10k one-page UPDATEs and BATCH_END packed
  beforehand and written by a bare C loop compiled here at run time with
  cffi (into a temporary directory, never kept): one write() a message,
  nothing else; then the same UPDATEs again through
  `VhostVdpa.write_iotlb_batch` (checks, framing and writing in C), through
  `DeviceIotlb` as one 10k-map commit (planning, the batch, booking the units),
  and one by one through `write_iotlb` (the per-message path);
- one-mapping transactions, `iotlb.map` and `iotlb.unmap` of one page, timed
  one by one; with `--baseline DIR` the same transactions are timed, in the
  same VM run, by the vdpad found in DIR (the tree before the batch path:
  `make bench-messages` unpacks it there from git).

    python -m tests.bench.messages [--out DIR] [--baseline DIR] [--repetitions N]

Writes DIR/messages.json (default DIR: $VDPAD_VM_OUT); tests/bench/plot_messages.py draws it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from tests.bench.common import compile_c, timed
from tests.sim import iova_far_from_us, sim_mode, vdpa_device
from vdpad.device import VhostVdpa
from vdpad.iotlb import PAGE_SIZE, DeviceIotlb, MemoryRegion

MESSAGES = 10_000
SINGLE_OPS = 200
RATE_TARGET = 0.3  # a 10k-message commit's message rate, as a share of the C loop's
SINGLE_SPEEDUP_TARGET = 5.0  # one-map and one-unmap transactions, today's time over the baseline's


def single_ops(iotlb: DeviceIotlb, memory: MemoryRegion, iova: int, count: int) -> dict[str, list[float]]:
    """Microseconds of each one-page map and unmap transaction (the API the baseline has too), back to back
    as a daemon commits them: the garbage collected once before the series and held off during it (a
    collection before each would time a cold interpreter; one during would bill one transaction for all)."""
    runs: dict[str, list[float]] = {"map_us": [], "unmap_us": []}
    clock = time.perf_counter
    gc.collect()
    gc.disable()
    try:
        for _ in range(count):
            start = clock()
            iotlb.map(0, iova, memory, 0, PAGE_SIZE)
            middle = clock()
            iotlb.unmap(0, iova, PAGE_SIZE)
            runs["map_us"].append((middle - start) * 1e6)
            runs["unmap_us"].append((clock() - middle) * 1e6)
    finally:
        gc.enable()
    return runs


C_DECLARATIONS = "int write_each(int fd, const char *messages, size_t size, size_t count);"
C_SOURCE = r"""
#include <unistd.h>

/* Every message written whole, in order: 0, or -1 at the first the kernel refuses (errno says why). */
static int write_each(int fd, const char *messages, size_t size, size_t count)
{
    size_t i;

    for (i = 0; i < count; i++)
        if (write(fd, messages + i * size, size) != (ssize_t)size)
            return -1;
    return 0;
}
"""


def rig(stack: ExitStack, name: str, pages: int) -> tuple[VhostVdpa, DeviceIotlb, MemoryRegion, int]:
    memory = stack.enter_context(MemoryRegion(pages * PAGE_SIZE, f"bench-{name}"))
    dev = stack.enter_context(VhostVdpa(stack.enter_context(vdpa_device(name, "vdpasim_net"))))
    dev.set_owner()
    iotlb = DeviceIotlb(dev)
    return dev, iotlb, memory, iova_far_from_us(iotlb.iova_range, 2 * pages * PAGE_SIZE)


def measure(repetitions: int) -> dict:
    from vdpad.device import IotlbBatch

    with ExitStack() as stack:
        stack.enter_context(sim_mode())  # vdpa_sim loaded, at its defaults: VA mode, set_map
        build = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vdpad-messages-")))
        ffi, lib = compile_c("_vdpad_bench_messages", C_DECLARATIONS, C_SOURCE, build)
        dev, iotlb, memory, base = rig(stack, "bmsg", MESSAGES)
        # One page every other page: no two UPDATEs continue each other, so a commit sends 10k.
        update = [(base + 2 * i * PAGE_SIZE, PAGE_SIZE, memory.address + i * PAGE_SIZE, 3) for i in range(MESSAGES)]
        span = (base, 2 * MESSAGES * PAGE_SIZE)
        fill = IotlbBatch(0, [], update, begin=True, end=True)
        empty = IotlbBatch(0, [span], [], begin=True, end=True)
        count = len(fill)

        def c_loop(batch: IotlbBatch) -> float:
            data, outcome = batch.pack(), []
            with dev._owned.use() as fd:
                seconds = timed(lambda: outcome.append(lib.write_each(fd, data, len(data) // len(batch), len(batch))))
            if outcome != [0]:
                raise OSError(ffi.errno, "the C loop was refused")
            return seconds

        def per_message(batch: IotlbBatch) -> None:
            for message in batch.messages():
                dev.write_iotlb(message)

        def commit() -> float:
            tx = iotlb.transaction(0)
            for iova, size, uaddr, _ in update:
                tx.map(iova, memory, uaddr - memory.address, size)
            seconds = timed(tx.commit)
            iotlb.unmap(0, *span)
            return seconds

        paths: dict[str, list[float]] = {"c_loop": [], "write_iotlb_batch": [], "commit": [], "write_iotlb": []}
        for repetition in range(repetitions):
            paths["c_loop"].append(c_loop(fill))
            c_loop(empty)
            # A batch of its own each time: a batch keeps its flattened arrays once made.
            paths["write_iotlb_batch"].append(timed(lambda: dev.write_iotlb_batch(
                IotlbBatch(0, [], update, begin=True, end=True))))
            dev.write_iotlb_batch(empty)
            paths["commit"].append(commit())
            if repetition == 0:  # about a second in the VM per run: once is enough
                paths["write_iotlb"].append(timed(lambda: per_message(fill)))
                per_message(empty)
        rates = {path: {"messages": count, "median_s": statistics.median(runs), "runs_s": runs,
                        "messages_per_s": count / statistics.median(runs),
                        "us_per_message": statistics.median(runs) / count * 1e6}
                 for path, runs in paths.items()}
        singles = single_ops(iotlb, memory, base, SINGLE_OPS)
    return {"ten_k": rates, "single": summarise(singles)}


def summarise(runs: dict[str, list[float]]) -> dict:
    return {op: {"median_us": statistics.median(values), "min_us": min(values),
                 "quartiles_us": [statistics.quantiles(values, n=4)[0], statistics.quantiles(values, n=4)[2]]}
            for op, values in runs.items()}


def baseline_singles() -> dict:
    """Run inside the baseline's interpreter (PYTHONPATH puts its vdpad first): one-page map and unmap."""
    with ExitStack() as stack:
        stack.enter_context(sim_mode())
        _, iotlb, memory, base = rig(stack, "bbase", 1)
        return summarise(single_ops(iotlb, memory, base, SINGLE_OPS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.messages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=os.environ.get("VDPAD_VM_OUT"))
    parser.add_argument("--baseline", type=Path, help="a tree whose vdpad is timed on single transactions too")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--baseline-only", action="store_true", help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args(argv)
    if args.baseline_only:
        import vdpad
        print(json.dumps({"vdpad": str(Path(vdpad.__file__).parent), "single": baseline_singles()}))
        return 0
    if args.out is None:
        parser.error("--out is needed outside the VM harness (no $VDPAD_VM_OUT)")
    import vdpad
    report = {
        "benchmark": "IOTLB messages on vdpasim_net (VA mode, set_map): the C write loop vs vdpad's paths",
        "command": "make bench-messages",
        "vdpad": str(Path(vdpad.__file__).parent),
        "kernel": platform.release(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "statistic": "median of repetitions",
        **measure(args.repetitions),
    }
    if args.baseline is not None:
        here = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.baseline.resolve()), str(here)])}
        # Run from the baseline tree: `-m` puts the working directory before PYTHONPATH.
        child = subprocess.run([sys.executable, "-m", "tests.bench.messages", "--baseline-only"], env=env,
                               cwd=args.baseline, capture_output=True, text=True, check=True)
        report["baseline"] = json.loads(child.stdout)
        if report["baseline"]["vdpad"] == report["vdpad"]:
            raise RuntimeError(f"the baseline imported this tree's vdpad ({report['vdpad']})")
    ten_k = report["ten_k"]
    ratio = ten_k["commit"]["messages_per_s"] / ten_k["c_loop"]["messages_per_s"]
    targets = {"commit_10k_vs_c_loop": {"ratio": ratio, "target": RATE_TARGET, "met": ratio >= RATE_TARGET}}
    if "baseline" in report:
        for op in ("map_us", "unmap_us"):
            speedup = report["baseline"]["single"][op]["median_us"] / report["single"][op]["median_us"]
            targets[f"single_{op[:-3]}_speedup"] = {"ratio": speedup, "target": SINGLE_SPEEDUP_TARGET,
                                                    "met": speedup >= SINGLE_SPEEDUP_TARGET}
    report["targets"] = targets
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "messages.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({path: round(r["us_per_message"], 2) for path, r in ten_k.items()}), file=sys.stderr)
    print(json.dumps(report["single"]), json.dumps(report.get("baseline")), file=sys.stderr)
    print(json.dumps(targets, indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
