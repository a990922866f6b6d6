"""Management from trio: each call runs in a worker thread with a socket of its own.

pyroute2 runs an asyncio loop of its own inside every synchronous call, and
binding waits by polling sysfs: neither may run on a trio loop. A fresh
VdpaNetlink per call keeps pyroute2's per-thread state inside that thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

import trio

from vdpad.mgmt.netlink import VdpaNetlink

P = ParamSpec("P")
T = TypeVar("T")


async def run(fn: Callable[Concatenate[VdpaNetlink, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
    """fn(netlink, *args, **kwargs) off the trio loop, e.g. `await run(VdpaNetlink.devices)`.

    Not abandoned on cancellation: an attach half done would be worse than waiting.
    """
    def call() -> T:
        with VdpaNetlink() as nl:
            return fn(nl, *args, **kwargs)

    return await trio.to_thread.run_sync(call)
