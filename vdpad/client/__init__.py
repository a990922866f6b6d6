"""The client library: talk to `vdpad serve` over its control socket (docs/protocol.md).

    from vdpad.client import Client
    from vdpad.iotlb import MemoryRegion

    with Client() as client, MemoryRegion(16 << 20, "ram") as ram:
        session = client.open_session("net0")        # the daemon opens and owns the device
        session.register(ram)                         # the memfd goes over the socket (SCM_RIGHTS)
        session.commit([session.map(iova, ram, 0, ram.size)])
        NetDriver(session.device, DmaArena(ram, iova)).start()   # the driver, over the session

Errors the daemon reports are raised as the class it caught (a RemoteError
too): InvalidArgument, NotSupportedError, NotFound... Blocking; AsyncClient
runs each call in a worker thread for trio programs.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from vdpad.device import DeviceStatus, VringAddr
from vdpad.device.iotlb_msg import Access
from vdpad.device.vdpa import IovaRange
from vdpad.iotlb.memory import MemoryRegion
from vdpad.service import wire
from vdpad.service.calls import DEVICE_CALLS, FD_ARGS
from vdpad.service.config import DEFAULT_SOCKET
from vdpad.service.protocol import VERSION, ProtocolError, RemoteError, remote_error

__all__ = ["AsyncClient", "AsyncSession", "Client", "DaemonUnavailable", "RemoteDomain", "RemoteError", "RemoteSession",
           "SessionDevice", "socket_path"]

_PERM_NAMES = {Access.RO: "ro", Access.WO: "wo", Access.RW: "rw"}


class DaemonUnavailable(ConnectionError):
    """No daemon answers on the socket."""


def socket_path(path: str | os.PathLike[str] | None = None) -> Path:
    """`path`, else $VDPAD_SOCKET, else the default /run/vdpad/control.sock."""
    return Path(path or os.environ.get("VDPAD_SOCKET") or DEFAULT_SOCKET)


class Client:
    """One connection to the daemon; its sessions close when it does (or when this process dies)."""

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = socket_path(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as error:
            self._sock.close()
            raise DaemonUnavailable(error.errno, f"no vdpad daemon answers on {self.path} ({error.strerror})") from None
        except BaseException:
            self._sock.close()
            raise
        self._ids = 0

    def call(self, op: str, args: dict[str, Any] | None = None, fds: Sequence[int] = ()) -> tuple[dict[str, Any], wire.ReceivedFds]:
        """Send one request and wait for its reply: (result, the fds it passed back, to be closed by the caller)."""
        self._ids += 1
        try:
            wire.send(self._sock, {"v": VERSION, "id": self._ids, "op": op, "args": args or {}}, fds)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon hung up; the reply it left before (a refusal) says why, read below
        try:
            got = wire.receive(self._sock)
        except ConnectionResetError:
            # The daemon hung up with our request unread: Linux tells that first (ECONNRESET, once),
            # and the reply it left before hanging up (a refusal) is still queued behind it.
            try:
                got = wire.receive(self._sock)
            except ConnectionResetError:
                got = None
        if got is None:
            raise DaemonUnavailable(0, f"the daemon on {self.path} closed the connection")
        reply, passed = got
        if not reply.get("ok"):
            passed.close()
            raise remote_error(reply.get("error") or {})
        if reply.get("id") != self._ids:
            passed.close()
            raise ProtocolError(f"reply to request {reply.get('id')!r} while waiting for {self._ids}")
        return reply.get("result") or {}, passed

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        """A call whose reply passes no fds."""
        result, passed = self.call(op, args)
        passed.close()
        return result

    # -- the daemon ----------------------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        return self.request("hello")

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def sessions(self) -> list[dict[str, Any]]:
        return self.request("session.list")["sessions"]

    def iotlb_show(self, device: str, asid: int | None = None) -> dict[str, Any]:
        """Every address space's map and kernel entries: a space cut into pages (iotlb.show's `next`) is
        asked for again from its cut until it is whole. A listing, not a snapshot: commits may land
        between pages."""
        shown = self.request("iotlb.show", device=device, **({} if asid is None else {"asid": asid}))
        for space in shown["spaces"]:
            while (start := space.pop("next", None)) is not None:
                more = self.request("iotlb.show", device=device, asid=space["asid"], **{"from": start})
                if more["session"] != shown["session"]:
                    raise RuntimeError(f"device {device} changed hands while its IOTLB was listed "
                                       f"(session {shown['session']}, now {more['session']})")
                (page,) = more["spaces"]
                space["map"] += page["map"]
                space["kernel"] += page["kernel"]
                space["next"] = page["next"]
        return shown

    def attach(self, name: str, mgmtdev: str, **options: Any) -> dict[str, Any]:
        return self.request("device.attach", name=name, mgmtdev=mgmtdev,
                            **{k: v for k, v in options.items() if v is not None})

    def detach(self, name: str) -> None:
        self.request("device.detach", name=name)

    def open_session(self, device: str, *, persist: bool = True) -> RemoteSession:
        return RemoteSession(self, self.request("session.open", device=device, persist=persist))

    def open_vhost_net(self, tap: int) -> RemoteSession:
        """A session on a vhost-net device of its own, backed by `tap` (a tap's fd: the daemon keeps a
        duplicate); it translates through a domain (RemoteDomain.attach) once ACCESS_PLATFORM is acked."""
        result, passed = self.call("session.open", {"device": "vhost-net", "tap": 0}, [tap])
        passed.close()
        return RemoteSession(self, result)

    # -- vIOMMU domains ------------------------------------------------------------------------
    def create_domain(self, name: str) -> RemoteDomain:
        self.request("domain.create", name=name)
        return RemoteDomain(self, name)

    def domains(self) -> list[dict[str, Any]]:
        return self.request("domain.list")["domains"]

    def domain_show(self, name: str) -> dict[str, Any]:
        """A domain and its whole map (asked for page by page, as iotlb_show)."""
        shown = self.request("domain.show", name=name)
        while (start := shown.pop("next", None)) is not None:
            more = self.request("domain.show", name=name, **{"from": start})
            shown["map"] += more["map"]
            shown["next"] = more["next"]
        return shown

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _HoldsMemory:
    """Memory handed to the daemon, held by a session or a domain (`request` names which)."""

    def request(self, op: str, fds: Sequence[int] = (), **args: Any) -> tuple[dict[str, Any], wire.ReceivedFds]:
        raise NotImplementedError

    def _plain(self, op: str, **args: Any) -> dict[str, Any]:
        result, passed = self.request(op, **args)
        passed.close()
        return result

    # -- memory ------------------------------------------------------------------------------
    def register(self, region: MemoryRegion, name: str | None = None) -> str:
        """Pass `region`'s memfd to the daemon, which maps the same bytes; returns its name there."""
        name = name or region.name
        self._plain_with_fd("memory.register", region.fd, name=name, offset=region.fd_offset, size=region.size)
        return name

    def _plain_with_fd(self, op: str, fd: int, **args: Any) -> dict[str, Any]:
        result, passed = self.request(op, fds=[fd], fd=0, **args)
        passed.close()
        return result

    def allocate(self, name: str, size: int) -> MemoryRegion:
        """Memory the daemon makes (a sealed memfd) and passes back, mapped here too."""
        result, passed = self.request("memory.alloc", name=name, size=size)
        with passed:
            return MemoryRegion.from_fd(passed[result["fd"]], 0, result["size"], name=name)

    def release(self, name: str) -> None:
        self._plain("memory.release", name=name)

    @staticmethod
    def map(iova: int, memory: MemoryRegion | str, offset: int, size: int, perm: Access = Access.RW) -> dict[str, Any]:
        name = memory if isinstance(memory, str) else memory.name
        return {"op": "map", "iova": iova, "size": size, "memory": name, "offset": offset, "perm": _PERM_NAMES[perm]}

    @staticmethod
    def unmap(iova: int, size: int) -> dict[str, Any]:
        return {"op": "unmap", "iova": iova, "size": size}


class RemoteSession(_HoldsMemory):
    """A session the daemon holds for this client: memory, IOTLB commits, the device's calls."""

    def __init__(self, client: Client, info: dict[str, Any]):
        self.client, self.info = client, info
        self.number: int = info["session"]
        self.device = SessionDevice(self)
        self.closed = False

    def request(self, op: str, fds: Sequence[int] = (), **args: Any) -> tuple[dict[str, Any], wire.ReceivedFds]:
        return self.client.call(op, {"session": self.number, **args}, fds)

    @property
    def iova_range(self) -> IovaRange:
        return IovaRange(self.info["iova_range"]["first"], self.info["iova_range"]["last"])

    # -- the IOTLB ---------------------------------------------------------------------------
    def commit(self, ops: Sequence[dict[str, Any]], asid: int = 0, *, allow_window: bool = False) -> dict[str, Any]:
        """One transaction: every op, or nothing (the plan that was sent)."""
        return self._plain("iotlb.commit", asid=asid, ops=list(ops), allow_window=allow_window)

    def set_group_asid(self, group: int, asid: int) -> None:
        self._plain("group.set_asid", group=group, asid=asid)

    def reset(self) -> dict[str, Any]:
        """SET_STATUS(0) through the daemon's engine: the maps are kept or replayed."""
        return self._plain("session.reset")

    # -- migration (docs/migration.md) -------------------------------------------------------
    def save(self) -> dict[str, Any]:
        """Suspend the running device and return its state, a JSON-serialisable document; the device stays
        suspended (`device.resume()` carries on)."""
        return self._plain("session.save")["state"]

    def load(self, state: dict[str, Any]) -> None:
        """Carry on from `state` on this session's reset device. Refused, nothing changed; failed half-way,
        the device is left reset with nothing mapped."""
        self._plain("session.load", state=state)

    def migrate_to(self, destination: RemoteSession) -> dict[str, Any]:
        """Save this device and load the state on `destination` (prepared ahead: memory registered, maps
        committed, the driver's eventfds bound); if the destination's daemon answers that the load failed,
        this device is resumed and carries on, and the error is raised. Returns the state.

        Any other failure (the reply lost, an interrupt) is raised with this device left suspended: the load
        may have landed, and resuming here could make two devices drive the same rings.

        Both sessions on one connection: one request (`session.migrate`), the daemon resuming the source
        itself when the load fails."""
        if destination.client is self.client:
            return self._plain("session.migrate", to=destination.number)["state"]
        state = self.save()
        try:
            destination.load(state)
        except RemoteError:
            self.device.resume()
            raise
        return state

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._plain("session.close")

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteDomain(_HoldsMemory):
    """A vIOMMU domain this client created: its memory, its map, the sessions that translate through it."""

    def __init__(self, client: Client, name: str):
        self.client, self.name = client, name
        self.closed = False

    def request(self, op: str, fds: Sequence[int] = (), **args: Any) -> tuple[dict[str, Any], wire.ReceivedFds]:
        return self.client.call(op, {"domain" if op.startswith("memory.") else "name": self.name, **args}, fds)

    def commit(self, ops: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """One transaction on the domain, pushed to every attached device before it returns."""
        return self._plain("domain.commit", ops=list(ops))

    def attach(self, session: RemoteSession, asid: int = 0) -> None:
        self._plain("domain.attach", session=session.number, asid=asid)

    def detach(self, session: RemoteSession) -> None:
        self._plain("domain.detach", session=session.number)

    def show(self) -> dict[str, Any]:
        return self.client.domain_show(self.name)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._plain("domain.close")

    def __enter__(self) -> RemoteDomain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SessionDevice:
    """The device of a session, with VhostVdpa's methods (DEVICE_CALLS) sent through the daemon.

    The virtio driver takes it in place of a VhostVdpa: one driver, two transports.
    """

    def __init__(self, session: RemoteSession):
        self.session = session
        self.path = f"{session.info['node']} (session {session.number})"

    def _call(self, name: str, *values: Any) -> Any:
        spec = DEVICE_CALLS[name]
        args: dict[str, Any] = {}
        fds: list[int] = []
        for arg, value in zip(spec.args, values, strict=True):
            if arg in FD_ARGS and value is not None:
                fds.append(value)
                value = 0
            elif isinstance(value, bytes):
                value = value.hex()
            args[arg] = value
        result, passed = self.session.request(f"device.{name}", fds=fds, **args)
        passed.close()
        value = result.get("value")
        if spec.result == "bytes":
            return bytes.fromhex(value)
        if spec.result == "range":
            return IovaRange(value["first"], value["last"])
        return value

    def get_status(self) -> DeviceStatus:
        return DeviceStatus(self._call("get_status"))

    def set_vring_addr(self, index: int, addr: VringAddr) -> None:
        self._call("set_vring_addr", index, addr.desc, addr.avail, addr.used)


def _forwarder(name: str) -> Any:
    def call(self: SessionDevice, *values: Any) -> Any:
        return self._call(name, *values)
    call.__name__ = name
    call.__doc__ = f"VhostVdpa.{name}, through the daemon."
    return call


for _name in DEVICE_CALLS:
    if not hasattr(SessionDevice, _name):
        setattr(SessionDevice, _name, _forwarder(_name))


class _InWorker:
    """Wraps a blocking object for trio: each method call runs in a worker thread, one at a time per
    connection (`lane`), in call order; what returns a RemoteSession returns it wrapped too."""

    def __init__(self, target: Any, lane: trio.CapacityLimiter):
        self._target, self._lane = target, lane

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        async def call(*args: Any, **kwargs: Any) -> Any:
            result = await trio.to_thread.run_sync(functools.partial(attribute, *args, **kwargs), limiter=self._lane)
            return AsyncSession(result, self._lane) if isinstance(result, RemoteSession) else result
        return call


class AsyncSession(_InWorker):
    """A RemoteSession for trio: `await session.commit(...)`; `.device` stays blocking (the driver's)."""

    async def migrate_to(self, destination: AsyncSession) -> dict[str, Any]:
        """RemoteSession.migrate_to, each side's requests on its own connection's lane."""
        if destination._target.client is self._target.client:
            return await trio.to_thread.run_sync(self._target.migrate_to, destination._target, limiter=self._lane)
        state = await self.save()
        try:
            await destination.load(state)
        except RemoteError:
            await self.call_device("resume")
            raise
        return state

    async def call_device(self, name: str, *values: Any) -> Any:
        """A call of the session's device (SessionDevice) in this connection's lane."""
        device = self._target.device
        return await trio.to_thread.run_sync(functools.partial(getattr(device, name), *values), limiter=self._lane)


class AsyncClient(_InWorker):
    """Client for trio: `client = await AsyncClient.connect()`, then `await client.status()`,
    `session = await client.open_session("net0")`, `await session.commit([...])`."""

    def __init__(self, client: Client):
        super().__init__(client, trio.CapacityLimiter(1))
        self.client = client

    @classmethod
    async def connect(cls, path: str | os.PathLike[str] | None = None) -> AsyncClient:
        return cls(await trio.to_thread.run_sync(Client, path))

    async def aclose(self) -> None:
        self.client.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
