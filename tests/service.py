"""The daemon rig the kernel tests and the demo share: `vdpad serve` as a process of its own.

A real process, so that a client's death, SIGTERM and the daemon's own
pins (VmPin) are the kernel's, not a simulation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vdpad.client import Client, DaemonUnavailable

VDPAD = str(Path(sys.executable).with_name("vdpad"))


@dataclass
class Daemon:
    process: subprocess.Popen
    socket: Path
    log: Path
    config: Path  # rewrite it and send SIGHUP to reload

    def client(self) -> Client:
        return Client(self.socket)

    def status(self, field: str) -> int:
        """One line of /proc/PID/status of the daemon, in bytes for kB fields (VmPin, VmLck)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                value = line.split()[1:]
                return int(value[0]) * (1024 if value[1:] == ["kB"] else 1)
        raise AssertionError(f"no {field} in the daemon's status")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def settled_fds(self, expected: int | None = None, timeout: float = 5.0) -> int:
        """The daemon's open fds once it has seen the connections a test closed go (it learns of it
        asynchronously): `expected` once it is reached, else a count that held still for 0.2 s."""
        deadline = time.monotonic() + timeout
        count = self.fds()
        while time.monotonic() < deadline:
            if count == expected:
                break
            time.sleep(0.2 if expected is None else 0.05)
            count, before = self.fds(), count
            if expected is None and count == before:
                break
        return count

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running_daemon(*extra: str, config: str | None = None, memlock: int | None = None,
                   env: dict[str, str] | None = None) -> Iterator[Daemon]:
    """`vdpad serve` on a socket of its own, answering when entered; stopped (and checked to exit 0) after."""
    with tempfile.TemporaryDirectory(prefix="vdpad-daemon-") as folder:
        os.chmod(folder, 0o755)  # any user reaches the socket: the daemon decides who may use it
        socket_path = Path(folder) / "control.sock"
        config_path = Path(folder) / "vdpad.toml"
        config_path.write_text(config or "")
        args = [VDPAD, "serve", "--socket", str(socket_path), "--config", str(config_path), *extra]
        log_path = Path(folder) / "daemon.log"

        def limits() -> None:
            if memlock is not None:
                import resource
                resource.setrlimit(resource.RLIMIT_MEMLOCK, (memlock, memlock))

        with open(log_path, "wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limits,
                                       env={**os.environ, "VDPAD_LOG": "debug", **(env or {})})
        daemon = Daemon(process, socket_path, log_path, config_path)
        try:
            _wait_until_answering(daemon)
            yield daemon
        finally:
            code = daemon.stop()
            if code != 0:
                print(daemon.log_text(), file=sys.stderr)
        assert code == 0, f"the daemon exited {code}"


def _wait_until_answering(daemon: Daemon, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if daemon.process.poll() is not None:
            raise AssertionError(f"the daemon exited {daemon.process.returncode}:\n{daemon.log_text()}")
        try:
            with daemon.client() as client:
                client.hello()
            return
        except DaemonUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
