"""Draw docs/bench/migration.json (from tests/bench/migration.py) as a PNG, on the host.

    python -m tests.bench.plot_migration docs/bench/migration.json docs/bench/migration.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from tests.bench.common import plot_command, save_figure  # noqa: E402

MODES = (("va", "VA", "#2a7ab0", -14), ("pa", "PA", "#d0703c", 14))  # the last: the value labels' x offset
MAPPINGS = (("early", "mapped early", "-", "o", -12), ("switch_over", "mapped at the switch-over", "--", "s", 5))


def _size_label(mib: int) -> str:
    return f"{mib} MiB" if mib < 1024 else f"{mib // 1024} GiB"


def _line(axes, sizes: list[int], rows: list[dict], label: str, colour: str, style: str, marker: str,
          offset: tuple[int, int]) -> None:
    medians = [r["median_ms"] for r in rows]
    spread = [[m - r["quartiles_ms"][0] for m, r in zip(medians, rows)],
              [r["quartiles_ms"][1] - m for m, r in zip(medians, rows)]]
    xs = [x + offset[0] / 300 for x in range(len(sizes))]  # the modes side by side, not over each other
    axes.errorbar(xs, medians, yerr=spread, capsize=3, color=colour, linestyle=style, marker=marker,
                  label=label)
    for x, value in zip(xs, medians):
        axes.annotate(f"{value:.0f}" if value >= 10 else f"{value:.1f}", (x, value), textcoords="offset points",
                      xytext=offset, ha="right" if offset[0] < 0 else "left", fontsize=8, color=colour)


def _verdicts(targets: dict) -> str:
    parts = []
    for name, check in targets.items():
        if "met" not in check:
            continue
        bound = f"<= {check['limit']}" if "limit" in check else f">= {check['target']}"
        parts.append(f"{name} {check['ratio']:.2f} ({bound}): {'met' if check['met'] else 'NOT met'}")
    lines = ["; ".join(parts[i:i + 2]) for i in range(0, len(parts), 2)]
    return "\n".join(lines)


def draw(report: dict, png: Path) -> None:
    results = report["results"]
    modes = [m for m in MODES if any(r["mode"] == m[0] for r in results)]
    sizes = sorted({r["size_mib"] for r in results})

    def rows(mode: str, mapping: str) -> list[dict]:
        return [next(r for r in results if (r["mode"], r["size_mib"], r["mapping"]) == (mode, mib, mapping))
                for mib in sizes]

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 6.2), gridspec_kw={"width_ratios": [3, 2]})
    for mode, name, colour, dx in modes:
        for mapping, label, style, marker, dy in MAPPINGS:
            _line(left, sizes, rows(mode, mapping), f"{name} mode, {label}", colour, style, marker, (dx, dy))
        _line(right, sizes, [r["early_map"] for r in rows(mode, "early")], f"{name} mode", colour, "-", "o", (dx, 6))
    left.set_ylabel("downtime, ms (median; bars: quartiles)")
    left.set_title("downtime: SUSPEND of the source -> first frame back on the destination", fontsize=10)
    right.set_ylabel("early map, ms (median; bars: quartiles)")
    right.set_title("the early map itself: one commit of the whole memory\n(before the switch-over, "
                    "outside the downtime)", fontsize=10)
    for axes in (left, right):
        axes.set_xticks(range(len(sizes)), [_size_label(mib) for mib in sizes])
        axes.set_xlim(-0.3, len(sizes) - 0.4)
        axes.set_xlabel("memory mapped in the device's IOTLB")
        axes.set_yscale("log")
        low, high = axes.get_ylim()
        axes.set_ylim(min(low, high / 4, 10), high * 1.3)  # at least a factor 4 shown: some labelled ticks
        axes.yaxis.set_major_locator(LogLocator(subs=(1, 2, 3, 5)))
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.yaxis.set_minor_formatter(NullFormatter())
        axes.grid(axis="y", which="both", alpha=0.3)
        axes.legend(loc="upper left", fontsize=8)
    figure.suptitle(f"vdpad migration over vdpasim_net, kernel {report['kernel']}, QEMU TCG guest "
                    f"({report['cpus']} vCPUs), {report['repetitions']} runs each\n{_verdicts(report['targets'])}",
                    fontsize=10)
    save_figure(figure, png)


def main(argv: list[str] | None = None) -> int:
    return plot_command(draw, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
