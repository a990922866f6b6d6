"""Draw docs/bench/restart.json (from tests/bench/restart.py) as a PNG, on the host.

    python -m tests.bench.plot docs/bench/restart.json docs/bench/restart.png

matplotlib is the bench extra (pip install -e '.[bench]'); nothing else needs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from tests.bench.common import plot_command, save_figure  # noqa: E402

SERIES = ((True, "IOTLB_PERSIST (maps kept)", "#2a7ab0"), (False, "no persist (maps replayed)", "#d0703c"))
MODES = (("va", "VA mode (default)"), ("pa", "PA mode (use_va=0: pages pinned)"))


def draw(report: dict, png: Path) -> None:
    results = report["results"]
    modes = [(mode, title) for mode, title in MODES if any(r["mode"] == mode for r in results)]
    sizes = sorted({r["memory_mib"] for r in results})
    figure, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.8), sharey=True, squeeze=False)
    width = 0.38
    for axis, (mode, title) in zip(axes[0], modes):
        for shift, (persist, label, colour) in zip((-width / 2, width / 2), SERIES):
            rows = [next(r for r in results if (r["mode"], r["memory_mib"], r["persist"]) == (mode, mib, persist))
                    for mib in sizes]
            medians = [r["median_ms"] for r in rows]
            spread = [[m - r["quartiles_ms"][0] for m, r in zip(medians, rows)],
                      [r["quartiles_ms"][1] - m for m, r in zip(medians, rows)]]
            xs = [i + shift for i in range(len(sizes))]
            axis.bar(xs, medians, width, yerr=spread, capsize=3, color=colour, label=label)
            for x, value, row in zip(xs, medians, rows):
                axis.annotate(f"{value:.0f}" if value >= 10 else f"{value:.1f}", (x, row["quartiles_ms"][1]),
                              textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
        axis.set_xticks(range(len(sizes)), [f"{mib} MiB" if mib < 1024 else f"{mib // 1024} GiB" for mib in sizes])
        axis.set_yscale("log")
        axis.set_title(title)
        axis.set_xlabel("memory mapped in the device's IOTLB")
        axis.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("restart time, ms (median; bars: quartiles)")
    axes[0][0].legend(loc="upper left", fontsize=8)
    figure.suptitle(f"vdpasim_net restart: reset -> rings -> DRIVER_OK -> first frame back "
                    f"({report['repetitions']} runs each, kernel {report['kernel']}, QEMU TCG guest)", fontsize=10)
    save_figure(figure, png)


def main(argv: list[str] | None = None) -> int:
    return plot_command(draw, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
