"""What the daemon costs (run inside the VM: `make bench-service`).

`vdpad serve` runs as a process of its own (tests/service.py, at its default
log level, warning) over vdpasim_net devices; in one run:

- one-mapping commits: a 64 KiB map, then its unmap, each its own
  transaction, sent by a client over a session (`RemoteSession.commit`) and,
  interleaved with them (order alternating), the same on another device of the
  same kind opened here (`DeviceIotlb.map`/`unmap`): every run, medians, p99
  and the daemon-over-in-process ratio of the medians. In VA mode (vdpa_sim's
  default) and, unless --no-pa, in PA mode (use_va=0: every map pins pages);
- round trips on an idle daemon: `hello` (the protocol's floor) and `status`
  (which lists the vdpa devices over netlink);
- the load: --clients client processes for --duration seconds, --sessions of
  them with a session each on a device of its own committing map and unmap in
  a loop, the rest reading status. Processes, not threads: each client then has
  its own interpreter, so the figures are the daemon's and not the load
  generator's GIL (forked from this process, so starting 32 costs no
  interpreter start-up). Each client counts requests sent and replies
  received in shared memory, so a client stuck on a lost reply is still
  counted; the daemon's own request counter must grow by exactly what was sent.
  The daemon's VmRSS is sampled every second.

    python -m tests.bench.service [--out DIR] [--commits N] [--round-trips N]
                                  [--duration S] [--clients N] [--sessions N] [--no-pa]
                                  [--profile-daemon]

Writes DIR/service.json (default DIR: $VDPAD_VM_OUT); tests/bench/plot_service.py draws it.
With --profile-daemon, only the VA commits run, the daemon under cProfile (every
thread of it: the trio loop and the lanes' workers), and DIR/service-profile.txt
says where its time goes; the profiler's own cost skews the times, so no
service.json then.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import pstats
import queue
import statistics
import sys
import tempfile
import textwrap
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench.common import timed
from tests.service import Daemon, running_daemon
from tests.sim import iova_far_from_us, sim_mode, vdpa_device
from vdpad.client import Client, RemoteError, RemoteSession
from vdpad.device import VhostVdpa
from vdpad.iotlb import DeviceIotlb, MemoryRegion

MAP_SIZE = 64 << 10
WARMUP = 20  # untimed commits first: the daemon's worker threads, the engine's first tree
COMMIT_RATIO_TARGET = 3.0  # daemon over in-process, median one-mapping commit, VA mode
RSS_GROWTH_LIMIT_PCT = 5.0  # "flat": the daemon's last RSS sample over the one after the warm-up
RSS_WARM_UP_S = 10  # the first seconds of load fill the worker threads' stacks and caches: not growth
GRACE_S = 30.0  # after the load's end, how long a client may take to finish its last request
DAEMON_LOG = {"VDPAD_LOG": "warning"}  # the daemon's default: no debug event per message
# Put first on the daemon's PYTHONPATH by --profile-daemon: the interpreter imports it before `vdpad serve`
# starts, profiles the main thread and every thread started after, and saves them all at exit.
PROFILER = textwrap.dedent("""\
    import atexit, cProfile, os, pstats, threading
    _profiles = [cProfile.Profile()]
    def _in_new_thread(*_):
        _profiles.append(cProfile.Profile())
        _profiles[-1].enable()  # this thread's profile hook from now on
    def _save():
        _profiles[0].disable()
        pstats.Stats(*_profiles).dump_stats(os.environ["VDPAD_BENCH_PROFILE"])
    threading.setprofile(_in_new_thread)
    atexit.register(_save)
    _profiles[0].enable()
""")


# ---------------------------------------------------------------------------- figures
def summary(seconds: list[float]) -> dict[str, Any]:
    """Percentiles in µs of a list of durations in seconds, and every run (rounded to 0.1 µs)."""
    runs = [round(s * 1e6, 1) for s in seconds]
    percentiles = statistics.quantiles(runs, n=100, method="inclusive")
    return {"n": len(runs), "median_us": statistics.median(runs), "p99_us": percentiles[98],
            "quartiles_us": [percentiles[24], percentiles[74]], "min_us": min(runs), "max_us": max(runs),
            "runs_us": runs}


def brief(seconds: list[float]) -> dict[str, Any]:
    """summary() without the runs (the load's figures: tens of thousands of them)."""
    if len(seconds) < 2:
        return {"n": len(seconds)}
    return {key: value for key, value in summary(seconds).items() if key != "runs_us"}


# ---------------------------------------------------------------------------- commits
def remote_session(stack: ExitStack, client: Client, device: str, memory: MemoryRegion) -> tuple[RemoteSession, int]:
    """A session on `device` with `memory` registered, closed by `stack`; an IOVA for the memory."""
    session = stack.enter_context(client.open_session(device))
    session.register(memory)
    return session, iova_far_from_us(session.iova_range, memory.size)


@dataclass
class CommitRig:
    """The same 64 KiB of memory mapped through a daemon's session on one device and here on another."""

    client: Client
    session: RemoteSession
    remote_iova: int
    iotlb: DeviceIotlb
    local_iova: int
    memory: MemoryRegion

    @classmethod
    def open(cls, stack: ExitStack, daemon: Daemon, device: str, node: Path) -> CommitRig:
        """A session on `device` through `daemon`; `node` (a device of the same kind) opened here, owned as a
        session owns its device (IOTLB_PERSIST acked). Closed by `stack`."""
        memory = stack.enter_context(MemoryRegion(MAP_SIZE, "bench-commit"))
        client = stack.enter_context(daemon.client())
        session, remote_iova = remote_session(stack, client, device, memory)
        dev = stack.enter_context(VhostVdpa(node))
        dev.set_owner()
        iotlb = DeviceIotlb(dev)
        return cls(client, session, remote_iova, iotlb, iova_far_from_us(iotlb.iova_range, MAP_SIZE), memory)


def commits(rig: CommitRig, count: int) -> dict[str, dict[str, list[float]]]:
    """`count` one-mapping map and unmap transactions through the daemon and in-process, interleaved
    (who goes first alternating); the runs in seconds."""
    session, iotlb, memory = rig.session, rig.iotlb, rig.memory
    remote_map, remote_unmap = [session.map(rig.remote_iova, memory, 0, MAP_SIZE)], [session.unmap(rig.remote_iova, MAP_SIZE)]
    paths = {
        "daemon": (lambda: session.commit(remote_map), lambda: session.commit(remote_unmap)),
        "in_process": (lambda: iotlb.map(0, rig.local_iova, memory, 0, MAP_SIZE),
                       lambda: iotlb.unmap(0, rig.local_iova, MAP_SIZE)),
    }
    for do_map, do_unmap in paths.values():
        for _ in range(WARMUP):
            do_map()
            do_unmap()
    runs: dict[str, dict[str, list[float]]] = {path: {"map": [], "unmap": []} for path in paths}
    for index in range(count):
        for path in (list(paths) if index % 2 == 0 else list(reversed(paths))):
            do_map, do_unmap = paths[path]
            runs[path]["map"].append(timed(do_map))
            runs[path]["unmap"].append(timed(do_unmap))
    return runs


def commit_report(runs: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    report: dict[str, Any] = {path: {op: summary(values) for op, values in ops.items()} for path, ops in runs.items()}
    report["ratio"] = {op: report["daemon"][op]["median_us"] / report["in_process"][op]["median_us"]
                       for op in ("map", "unmap")}
    return report


def round_trips(rig: CommitRig, count: int) -> dict[str, Any]:
    """On an idle daemon, in turn: `hello` (the protocol alone), `status` (netlink lists the devices) and
    `device.get_status` (one cheap ioctl in the session's lane: the floor of every call on a device,
    commits included); the same ioctl here, for scale."""
    client, device = rig.client, rig.session.device
    calls = {"hello": client.hello, "status": client.status, "device_get_status": device.get_status,
             "in_process_get_status": rig.iotlb.dev.get_status}
    for call in calls.values():
        for _ in range(WARMUP):
            call()
    runs: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(count):
        for name, call in calls.items():
            runs[name].append(timed(call))
    return {name: summary(values) for name, values in runs.items()}


# ---------------------------------------------------------------------------- the load
SENT, REPLIED, ERRORS = range(3)


def load_client(number: int, socket: Path, device: str | None, counts, ready, go, deadline, results) -> None:
    """One client process: with `device`, a session committing a map then its unmap in a loop; else status.

    counts[3 * number + SENT/REPLIED/ERRORS] are this client's, updated around every request."""
    mine = 3 * number
    failure = None
    with ExitStack() as stack:
        try:
            client = stack.enter_context(Client(socket))
            if device is not None:
                memory = stack.enter_context(MemoryRegion(MAP_SIZE, f"load-{number}"))
                session, iova = remote_session(stack, client, device, memory)
                map_ops, unmap_ops = [session.map(iova, memory, 0, MAP_SIZE)], [session.unmap(iova, MAP_SIZE)]
                requests = [("map", lambda: session.commit(map_ops)), ("unmap", lambda: session.commit(unmap_ops))]
            else:
                requests = [("status", client.status)]
        except BaseException:
            ready.abort()  # the others, and the parent, stop waiting for this one
            raise
        latencies: dict[str, list[float]] = {name: [] for name, _ in requests}
        ready.wait()
        go.wait()
        end = deadline.value
        while failure is None and time.monotonic() < end:
            for name, request in requests:  # a map is always followed by its unmap
                counts[mine + SENT] += 1
                start = time.perf_counter()
                try:
                    request()
                except RemoteError as error:  # a reply, saying no: counted, and this client stops
                    counts[mine + REPLIED] += 1
                    counts[mine + ERRORS] += 1
                    failure = f"{name}: {error}"
                    break
                except OSError as error:  # the connection is gone: no reply will come
                    failure = f"{name}: {error!r}"
                    break
                counts[mine + REPLIED] += 1
                latencies[name].append(time.perf_counter() - start)
        if device is not None and failure is None:  # a request too: the daemon counts it
            counts[mine + SENT] += 1
            session.close()
            counts[mine + REPLIED] += 1
    results.put({"client": number, "device": device, "latencies_s": latencies, "failure": failure})


def load(daemon: Daemon, devices: list[str], clients: int, duration: float) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")  # this interpreter's imports, already done
    counts = context.Array("q", 3 * clients, lock=False)  # each slot written by one client only
    ready = context.Barrier(clients + 1)
    go = context.Event()
    deadline = context.Value("d", 0.0, lock=False)
    results = context.Queue()
    workers = [context.Process(target=load_client, name=f"load-{n}", daemon=True,
                               args=(n, daemon.socket, devices[n] if n < len(devices) else None,
                                     counts, ready, go, deadline, results))
               for n in range(clients)]
    rss_idle_kib = daemon.status("VmRSS") // 1024
    for worker in workers:
        worker.start()
    try:
        ready.wait(timeout=300)  # every client connected, every session open
        rss_connected_kib = daemon.status("VmRSS") // 1024
        with Client(daemon.socket) as own:
            requests_before = own.status()["counters"]["requests"]
            start = time.monotonic()
            deadline.value = start + duration
            go.set()
            samples = []
            while (now := time.monotonic()) < deadline.value:
                samples.append({"t_s": round(now - start, 3), "rss_kib": daemon.status("VmRSS") // 1024,
                                "fds": daemon.fds()})
                time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
            reports = []
            for _ in workers:
                try:
                    reports.append(results.get(timeout=max(0.1, deadline.value + GRACE_S - time.monotonic())))
                except queue.Empty:
                    break
            elapsed = time.monotonic() - start
            sent = sum(counts[3 * n + SENT] for n in range(clients))
            replied = sum(counts[3 * n + REPLIED] for n in range(clients))
            errors = sum(counts[3 * n + ERRORS] for n in range(clients))
            # The daemon counts a request as it starts: ours (the status below) is one more.
            daemon_requests = own.status()["counters"]["requests"] - requests_before - 1
    finally:
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():  # stuck on a reply that never came
                worker.kill()
                worker.join()
    by_kind: dict[str, list[float]] = {}
    for report in reports:
        for name, values in report["latencies_s"].items():
            by_kind.setdefault(name, []).extend(values)
    rss = [sample["rss_kib"] for sample in samples]
    warm = next((sample["rss_kib"] for sample in samples if sample["t_s"] >= RSS_WARM_UP_S), rss[-1])
    return {
        "clients": clients, "session_clients": len(devices), "status_clients": clients - len(devices),
        "duration_s": duration, "elapsed_s": elapsed,
        "requests_sent": sent, "replies_received": replied, "lost": sent - replied, "errors": errors,
        "daemon_requests_counted": daemon_requests, "clients_reported": len(reports),
        "failures": [r["failure"] for r in reports if r["failure"]],
        "requests_per_s": replied / elapsed,
        "per_kind": {name: {"replies": len(values), "per_s": len(values) / duration, **brief(values)}
                     for name, values in by_kind.items()},
        "rss_kib": {"idle": rss_idle_kib, "connected": rss_connected_kib, "first": rss[0], "warm": warm,
                    "last": rss[-1], "max": max(rss), "warm_up_s": RSS_WARM_UP_S,
                    "growth_pct": (rss[-1] - warm) / warm * 100},
        "samples": samples,
    }


# ---------------------------------------------------------------------------- the run
def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One daemon over vdpa_sim in `mode` (va, pa): commits; in VA mode the round trips and the load too."""
    heavy = mode == "va"
    with ExitStack() as stack:
        stack.enter_context(sim_mode(use_va=mode == "va"))
        devices = [f"bsvc{n}" for n in range(args.sessions if heavy else 1)]
        for name in devices:
            stack.enter_context(vdpa_device(name, "vdpasim_net"))
        local_node = stack.enter_context(vdpa_device("bsvclocal", "vdpasim_net"))
        daemon = stack.enter_context(running_daemon(env=DAEMON_LOG))
        report: dict[str, Any] = {}
        with ExitStack() as rig_stack:  # its session's device goes to a load client after
            rig = CommitRig.open(rig_stack, daemon, devices[0], local_node)
            report["commit"] = commit_report(commits(rig, args.commits))
            print(f"{mode}: commit ratio {report['commit']['ratio']}", file=sys.stderr)
            if heavy:
                report["round_trip"] = round_trips(rig, args.round_trips)
        if heavy:
            report["load"] = load(daemon, devices, args.clients, args.duration)
    return report


def targets(report: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    for op, ratio in report["va"]["commit"]["ratio"].items():
        checks[f"va_{op}_commit_ratio"] = {"ratio": ratio, "target_at_most": COMMIT_RATIO_TARGET,
                                          "met": ratio <= COMMIT_RATIO_TARGET}
    loaded = report["va"]["load"]
    checks["load_none_lost"] = {"lost": loaded["lost"], "errors": loaded["errors"],
                                "daemon_counted_every_request": loaded["daemon_requests_counted"] == loaded["requests_sent"],
                                "met": loaded["lost"] == 0 and loaded["errors"] == 0
                                and loaded["daemon_requests_counted"] == loaded["requests_sent"]}
    growth = loaded["rss_kib"]["growth_pct"]
    checks["load_rss_flat"] = {"growth_pct": growth, "limit_pct": RSS_GROWTH_LIMIT_PCT,
                               "met": growth <= RSS_GROWTH_LIMIT_PCT}
    return checks


def profile_daemon(args: argparse.Namespace) -> Path:
    """The VA commits with the daemon under cProfile; where its time went, as text."""
    with tempfile.TemporaryDirectory(prefix="vdpad-profile-") as folder:
        (Path(folder) / "sitecustomize.py").write_text(PROFILER)
        saved = Path(folder) / "daemon.prof"
        env = {**DAEMON_LOG, "VDPAD_BENCH_PROFILE": str(saved),
               "PYTHONPATH": os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")]))}
        with ExitStack() as stack:
            stack.enter_context(sim_mode())
            stack.enter_context(vdpa_device("bsvc0", "vdpasim_net"))
            local_node = stack.enter_context(vdpa_device("bsvclocal", "vdpasim_net"))
            daemon = stack.enter_context(running_daemon(env=env))
            ratio = commit_report(commits(CommitRig.open(stack, daemon, "bsvc0", local_node), args.commits))["ratio"]
        text = args.out / "service-profile.txt"
        with text.open("w") as out:
            print(f"vdpad serve under cProfile, {args.commits} one-mapping map and unmap commits after {WARMUP} "
                  f"of each (kernel {platform.release()}); daemon/in-process median ratio under the profiler: "
                  f"{ratio}", file=out)
            stats = pstats.Stats(str(saved), stream=out)
            stats.sort_stats("tottime").print_stats(30)
            stats.sort_stats("cumulative").print_stats(r"vdpad/(service|iotlb|device)|trio/_threads", 40)
            stats.print_callees(r"_one_request|server.py.*\(run\)|server.py.*\(_commit\)|sessions.py.*\(commit\)")
        (args.out / "service-daemon.prof").write_bytes(saved.read_bytes())  # for pstats, to dig further
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=os.environ.get("VDPAD_VM_OUT"))
    parser.add_argument("--commits", type=int, default=1000, help="one-mapping map+unmap pairs per path")
    parser.add_argument("--round-trips", type=int, default=500, help="hello and status calls each")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--sessions", type=int, default=8, help="clients of the load with a session (and a device)")
    parser.add_argument("--no-pa", dest="pa", action="store_false", help="skip the commits in PA mode")
    parser.add_argument("--profile-daemon", action="store_true",
                        help="only the VA commits, the daemon profiled: DIR/service-profile.txt")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out is needed outside the VM harness (no $VDPAD_VM_OUT)")
    if not 0 < args.sessions <= args.clients:
        parser.error(f"--sessions {args.sessions} must be between 1 and --clients ({args.clients})")
    if args.commits < 2 or args.round_trips < 2 or args.duration <= 0:
        parser.error("--commits and --round-trips need at least 2 runs, --duration more than 0 s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile_daemon:
        print(f"wrote {profile_daemon(args)}", file=sys.stderr)
        return 0
    report: dict[str, Any] = {
        "benchmark": "vdpad serve over vdpasim_net: one-mapping commits through the daemon vs in-process, "
                     "round trips, and a load of concurrent clients",
        "command": "make bench-service",
        "kernel": platform.release(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "daemon_log_level": DAEMON_LOG["VDPAD_LOG"], "map_size_bytes": MAP_SIZE, "warmup_runs": WARMUP,
        "statistic": "client-side wall time per request, µs",
        "modes": {"va": "vdpa_sim use_va=1 (default)", "pa": "vdpa_sim use_va=0: every map pins pages"},
        "va": run_mode("va", args),
    }
    if args.pa:
        report["pa"] = run_mode("pa", args)
    report["targets"] = targets(report)
    (args.out / "service.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["targets"], indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
