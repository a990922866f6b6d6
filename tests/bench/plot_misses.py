"""Draw docs/bench/misses.json (from tests/bench/misses.py) as a PNG, on the host.

    python -m tests.bench.plot_misses docs/bench/misses.json docs/bench/misses.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from tests.bench.common import plot_command, save_figure  # noqa: E402

SERVERS = (("c_loop", "C loop (reference)", "#777777"), ("miss_server", "MissServer in-process", "#2a7ab0"),
           ("daemon", "vdpad serve (daemon)", "#d0622b"))


def draw_service_times(axes, servers: dict) -> None:
    """Each server's service times as the share of misses answered within a time: the whole distribution where
    the bench saw every time, else (the daemon, which tells p50 and p99 only) those two: the medians as diamonds,
    each repetition's as dots."""
    shares = [n / 100 for n in range(1, 100)]
    for key, label, colour in SERVERS:
        figures = servers[key]
        label = f"{label}: p50 {figures['p50_us']:.1f}, p99 {figures['p99_us']:.1f} µs"
        if "percentiles_us" in figures:
            axes.plot(figures["percentiles_us"], shares, color=colour, label=label)
            continue
        runs = figures["runs"]
        axes.plot([run["p50_us"] for run in runs] + [run["p99_us"] for run in runs],
                  [0.5] * len(runs) + [0.99] * len(runs), ".", color=colour, alpha=0.5, markersize=5)
        axes.plot([figures["p50_us"], figures["p99_us"]], [0.5, 0.99], "D", color=colour, label=label)
    axes.set_xscale("log")
    axes.set_xlabel("µs from the MISS read to the UPDATE written")
    axes.set_ylabel("share of misses answered (p1 to p99)")
    axes.set_title("service time per miss (daemon: p50 and p99 as it tells them)")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize="small")


def draw_rates(axes, servers: dict, targets: dict) -> None:
    """Misses served per second of the serving phases, each repetition a dot, the median a bar."""
    for index, (key, label, colour) in enumerate(SERVERS):
        figures = servers[key]
        bar = axes.bar(index, figures["misses_per_s"], 0.6, color=colour, alpha=0.7)
        axes.bar_label(bar, labels=[f"{figures['misses_per_s']:.0f}/s"], label_type="center")
        runs = [run["misses_per_s"] for run in figures["runs"]]
        axes.plot([index] * len(runs), runs, "k.", markersize=5)
    axes.set_xticks(range(len(SERVERS)), [label for _, label, _ in SERVERS], fontsize="small")
    axes.set_ylabel("misses served per second (bar: median, dots: repetitions)")
    verdict = {True: "met", False: "not met"}
    lines = []
    for key, label in (("daemon", "daemon"), ("miss_server", "in-process")):
        p50, rate = targets[key]["p50_ratio"], targets[key]["throughput_ratio"]
        lines.append(f"{label} / C loop: p50 {p50['ratio']:.2f}x (<= {p50['target']:g}: {verdict[p50['met']]}), "
                     f"rate {rate['ratio']:.2f}x (>= {rate['target']:.2f}: {verdict[rate['met']]})")
    axes.set_title("\n".join(lines), fontsize="medium")


def draw(report: dict, png: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5.8))
    draw_service_times(left, report["servers"])
    draw_rates(right, report["servers"], report["targets"])
    work = report["workload"]
    figure.suptitle(f"device-IOTLB misses on vhost-net, {work['frames_per_round']} a round, {work['rounds']} rounds "
                    f"x {work['repetitions']} repetitions; kernel {report['kernel']}, QEMU TCG guest "
                    f"({report['cpus']} vCPUs)")
    save_figure(figure, png)


def main(argv: list[str] | None = None) -> int:
    return plot_command(draw, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
