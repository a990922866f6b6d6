"""Draw docs/bench/service.json (from tests/bench/service.py) as a PNG, on the host.

    python -m tests.bench.plot_service docs/bench/service.json docs/bench/service.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from tests.bench.common import plot_command, save_figure  # noqa: E402

PATHS = (("daemon", "through the daemon", "#2a7ab0"), ("in_process", "in-process", "#777777"))
ROUND_TRIPS = (("hello", "hello"), ("device_get_status", "device.get_status (session lane)"),
               ("status", "status (netlink)"), ("in_process_get_status", "get_status in-process"))


def draw_commits(axes, report: dict) -> None:
    """Box per path, op and mode: the box the quartiles, the whiskers p1 to p99; the ratio of medians above."""
    groups = [(mode, op) for mode in ("va", "pa") if mode in report for op in ("map", "unmap")]
    width = 0.36
    for index, (path, label, colour) in enumerate(PATHS):
        shift = (index - 0.5) * width
        boxes = axes.boxplot([report[mode]["commit"][path][op]["runs_us"] for mode, op in groups],
                             positions=[g + shift for g in range(len(groups))], widths=width * 0.9,
                             whis=(1, 99), showfliers=False, patch_artist=True)
        for box in boxes["boxes"]:
            box.set(facecolor=colour, alpha=0.6)
        axes.plot([], [], color=colour, linewidth=8, alpha=0.6, label=label)
    for position, (mode, op) in enumerate(groups):
        commit = report[mode]["commit"]
        top = commit["daemon"][op]["p99_us"]
        axes.annotate(f"{commit['ratio'][op]:.1f}x", (position, top), textcoords="offset points", xytext=(0, 4),
                      ha="center")
    axes.set_xticks(range(len(groups)), [f"{op}\n{mode.upper()} mode" for mode, op in groups])
    axes.set_yscale("log")
    axes.set_ylabel("µs per 64 KiB commit (box: quartiles, whiskers: p1-p99)")
    axes.set_title(f"one-mapping commits ({report['va']['commit']['daemon']['map']['n']} each);\n"
                   "daemon over in-process median above")
    axes.legend(loc="center right")


def draw_round_trips(axes, round_trips: dict) -> None:
    """Each call's distribution as the share of calls done within a time."""
    for key, label in ROUND_TRIPS:
        runs = sorted(round_trips[key]["runs_us"])
        shares = [(n + 1) / len(runs) for n in range(len(runs))]
        axes.step(runs, shares, where="post",
                  label=f"{label}: p50 {round_trips[key]['median_us'] / 1e3:.2f}, p99 {round_trips[key]['p99_us'] / 1e3:.2f} ms")
    axes.set_xscale("log")
    axes.set_xlabel("µs per call")
    axes.set_ylabel("share of calls done")
    axes.set_title(f"round trips on an idle daemon ({round_trips['hello']['n']} each)")
    axes.legend(loc="lower right", fontsize="small")


def draw_load(axes, load: dict) -> None:
    seconds = [sample["t_s"] for sample in load["samples"]]
    axes.plot(seconds, [sample["rss_kib"] / 1024 for sample in load["samples"]], marker=".", color="#d0703c")
    rss = load["rss_kib"]
    axes.set_ylim(0, rss["max"] / 1024 * 1.25)
    axes.set_xlabel("s into the load")
    axes.set_ylabel("daemon VmRSS (MiB)")
    axes.set_title(f"{load['clients']} clients ({load['session_clients']} committing, {load['status_clients']} "
                   f"reading status), {load['duration_s']:.0f} s:\n{load['requests_per_s']:.0f} requests/s, "
                   f"{load['lost']} lost, {load['errors']} errors; RSS {rss['growth_pct']:+.1f}% from {rss['warm_up_s']} s to the end")


def draw(report: dict, png: Path) -> None:
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 5.4))
    draw_commits(left, report)
    draw_round_trips(middle, report["va"]["round_trip"])
    draw_load(right, report["va"]["load"])
    figure.suptitle(f"vdpad serve over vdpasim_net, kernel {report['kernel']}, QEMU TCG guest "
                    f"({report['cpus']} vCPUs), client-side times")
    save_figure(figure, png)


def main(argv: list[str] | None = None) -> int:
    return plot_command(draw, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
