"""The client half of `make demo`: a session on a vdpasim_net device, through the daemon only.

It never opens the device node: the daemon owns it. The client hands the
daemon a memfd, maps it, drives the device with the userspace virtio driver
over the session, resets with persistence, and shows the daemon's view.
"""

from __future__ import annotations

import subprocess
import sys

from tests.sim import frames, iova_far_from_us
from vdpad.client import Client
from vdpad.iotlb import MemoryRegion
from vdpad.virtio import DmaArena, NetDriver

FRAMES = 32


def show(vdpad: str, *args: str) -> None:
    print(f"\n$ vdpad {' '.join(args)}", flush=True)
    subprocess.run([vdpad, *args], check=True)


def exchange(net: NetDriver, seed: int) -> None:
    sent = frames(FRAMES, seed=seed)
    if net.exchange(sent) != sent:
        raise SystemExit("frames came back changed")
    print(f"{FRAMES} frames out through TX and back on RX, intact")


def main(vdpad: str, device: str) -> None:
    with Client() as client, MemoryRegion(1 << 20, "guest-ram") as ram:
        session = client.open_session(device)
        print(f"session {session.number} on {session.info['node']}: persistent maps "
              f"{session.info['persistent']}, IOVA range {session.iova_range}")
        session.register(ram)
        iova = iova_far_from_us(session.iova_range, ram.size)
        plan = session.commit([session.map(iova, ram, 0, ram.size)])
        print(f"mapped {ram.size:#x} bytes at IOVA {iova:#x}: {plan['messages']} IOTLB message(s)")
        with DmaArena(ram, iova) as arena, NetDriver(session.device, arena) as net:
            net.start()
            exchange(net, seed=1)
            kept = session.reset()["persistent"]
            print(f"device reset; the kernel {'kept' if kept else 'was sent again'} the maps")
            net.start()
            exchange(net, seed=2)
            show(vdpad, "status")
            show(vdpad, "session", "list")
            show(vdpad, "iotlb", "show", device)
        session.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
