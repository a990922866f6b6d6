"""Draw docs/bench/engine.json (from tests/bench/engine.py) as a PNG, on the host.

    python -m tests.bench.plot_engine docs/bench/engine.json docs/bench/engine.png

matplotlib is the bench extra (pip install -e '.[bench]'); nothing else needs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from tests.bench.common import plot_command, save_figure  # noqa: E402

LABELS = {"grow_10k_s": "10k one-map commits\nfrom empty (s)", "lookup_100k_us": "lookup at\n100k entries (µs)",
          "plan_10k_ms": "plan between two\n10k-entry maps (ms)"}


def draw(report: dict, png: Path) -> None:
    figure, (by_size, targets) = plt.subplots(1, 2, figsize=(11, 4.4))
    rows = report["commit_by_size"]
    sizes = [row["entries"] for row in rows]
    by_size.plot(sizes, [row["commit_us"] for row in rows], "o-", color="#2a7ab0", label="one-operation commit")
    for size, row in zip(sizes, rows):
        by_size.annotate(f"{row['commit_us']:.0f} µs", (size, row["commit_us"]), textcoords="offset points",
                         xytext=(0, 6), ha="center", fontsize=8)
    by_size.set_xscale("log")
    by_size.set_ylim(0, max(row["commit_us"] for row in rows) * 1.6)
    by_size.set_xlabel("entries in the address space")
    by_size.set_ylabel("µs per commit (map or unmap, engine logic only)")
    by_size.set_title("a commit's cost grows with log(entries) only")
    by_size.grid(alpha=0.3)
    by_size.legend(loc="lower right", fontsize=8)

    names = list(report["targets"])
    shares = [report["targets"][n]["measured"] / report["targets"][n]["limit"] * 100 for n in names]
    bars = targets.bar(range(len(names)), shares, color=["#2a7ab0" if s <= 100 else "#d0703c" for s in shares])
    for bar, name in zip(bars, names):
        target = report["targets"][name]
        targets.annotate(f"{target['measured']:.3g} / {target['limit']:g}", (bar.get_x() + bar.get_width() / 2,
                         bar.get_height()), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    targets.axhline(100, color="black", linewidth=0.8, linestyle="--")
    targets.set_xticks(range(len(names)), [LABELS.get(n, n) for n in names], fontsize=8)
    targets.set_ylabel("% of the target (below the line: met)")
    targets.set_title("targets")
    refs = report["references"]
    figure.suptitle(f"IOTLB engine on the host, Python {report['python']} "
                    f"(this machine: bisect lookup {refs['bisect_lookup_100k_us']:.2f} µs, "
                    f"the old rebuild-per-map growth to 1k {refs['rebuild_per_op_grow_1k_s']:.2f} s)", fontsize=9)
    save_figure(figure, png)


def main(argv: list[str] | None = None) -> int:
    return plot_command(draw, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
