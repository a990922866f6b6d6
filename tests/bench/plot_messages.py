"""Draw docs/bench/messages.json (from tests/bench/messages.py) as a PNG, on the host.

    python -m tests.bench.plot_messages docs/bench/messages.json docs/bench/messages.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from tests.bench.common import plot_command, save_figure  # noqa: E402

PATHS = (("c_loop", "C loop alone\n(pre-packed)"), ("write_iotlb_batch", "write_iotlb_batch\n(checks, pack, loop)"),
         ("commit", "DeviceIotlb\ncommit"), ("write_iotlb", "write_iotlb\n(one by one)"))


def draw(report: dict, png: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    ten_k = report["ten_k"]
    shown = [(key, label) for key, label in PATHS if key in ten_k]
    values = [ten_k[key]["us_per_message"] for key, _ in shown]
    colours = ["#777777", "#2a7ab0", "#2a7ab0", "#d0703c"][:len(shown)]
    bars = left.bar([label for _, label in shown], values, color=colours)
    left.bar_label(bars, labels=[f"{v:.1f}" for v in values])
    left.set_yscale("log")
    left.set_ylabel("µs per message (median run)")
    left.set_title(f"{ten_k['c_loop']['messages']} IOTLB messages, one batch")
    ops = ("map_us", "unmap_us")
    width = 0.38
    series = [("this tree", report["single"], "#2a7ab0")]
    if "baseline" in report:
        series.insert(0, ("before (per-message writes)", report["baseline"]["single"], "#d0703c"))
    for index, (label, single, colour) in enumerate(series):
        shift = (index - (len(series) - 1) / 2) * width
        medians = [single[op]["median_us"] for op in ops]
        lows = [m - single[op]["quartiles_us"][0] for m, op in zip(medians, ops)]
        highs = [single[op]["quartiles_us"][1] - m for m, op in zip(medians, ops)]
        bars = right.bar([i + shift for i in range(len(ops))], medians, width, yerr=[lows, highs],
                         label=label, color=colour, capsize=3)
        right.bar_label(bars, labels=[f"{m:.0f}" for m in medians])
    right.set_xticks(range(len(ops)), ["one-page map", "one-page unmap"])
    right.set_ylabel("µs per transaction (median, quartiles)")
    right.set_title("single-operation transactions")
    right.legend()
    figure.suptitle(f"vdpasim_net, kernel {report['kernel']}, QEMU TCG guest")
    save_figure(figure, png)


def main(argv: list[str] | None = None) -> int:
    return plot_command(draw, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
