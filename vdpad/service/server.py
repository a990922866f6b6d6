"""`vdpad serve`: the trio loop that owns devices on behalf of clients on the control socket.

One task per connection reads a request, runs it and sends the reply, so a
client that sends nothing or reads nothing holds up only itself. Everything
that blocks (ioctls, IOTLB writes, netlink, sysfs) runs in worker threads:
device calls in their session's lane, in call order. A request that started
runs to its end (shielded); a client that goes away has its sessions closed
at once. SIGTERM stops accepting, lets running requests finish, closes every
session and exits 0; SIGHUP reconciles the configured devices again.
"""

from __future__ import annotations

import array
import dataclasses
import errno
import grp
import importlib.metadata
import itertools
import json
import os
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from vdpad import log as vdpad_log
from vdpad.iotlb import MemoryRegion
from vdpad.mgmt import aio, binding, lifecycle
from vdpad.mgmt.binding import Driver
from vdpad.mgmt.errors import Busy, NotFound
from vdpad.mgmt.netlink import VdpaNetlink
from vdpad.mgmt.parent import device_of_node
from vdpad.mgmt.records import device_record
from vdpad.service import switchover, systemd, wire
from vdpad.service.calls import BOOL_ARGS, BYTES_ARGS, DEVICE_CALLS, FD_ARGS
from vdpad.service.config import DEFAULT_CONFIG, Config, ConfigError, load
from vdpad.service.migration import DeviceState
from vdpad.service.reconcile import reconcile
from vdpad.service.protocol import MAX_MESSAGE, VERSION, ProtocolError, Unauthorized, error_kind, error_reply
from vdpad.service.domains import Domain
from vdpad.service.memory import MemoryHolder
from vdpad.service.net_session import NET_DEVICE, NetSession
from vdpad.service.sessions import PERMS, Counters, MapOp, Peer, Session, page_of, mapping_record, plan_record, vm_pinned
from vdpad.service.wire import ReceivedFds

log = structlog.get_logger("vdpad.service")

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
SERVER_VERSION = importlib.metadata.version("vdpad")
REPLY_TIMEOUT = 10.0  # s a client may leave a reply unread before it is dropped
# Entries of each list one iotlb.show reply holds by default: well under the message limit (~100 bytes
# apiece, two lists, every address space); the client asks for the next page from where it stops.
SHOW_PAGE, SHOW_PAGE_MAX = 256, 4096
STOP_REPLY_TIMEOUT = 1.0  # the same once SIGTERM came: the daemon exits within a few seconds


# ---------------------------------------------------------------------------- arguments
_REQUIRED = object()


class Args:
    """A request's arguments, taken one by one with their types checked; done() refuses the rest."""

    def __init__(self, op: str, raw: Any, fds: ReceivedFds):
        if not isinstance(raw, dict):
            raise ProtocolError(f"{op}: args must be a JSON object, not {type(raw).__name__}")
        self.op, self._raw, self._fds = op, dict(raw), fds

    def _take(self, name: str, default: Any) -> Any:
        if name not in self._raw:
            if default is _REQUIRED:
                raise ProtocolError(f"{self.op}: argument {name!r} is missing")
            return default
        return self._raw.pop(name)

    def _wrong(self, name: str, value: Any, what: str) -> ProtocolError:
        return ProtocolError(f"{self.op}: argument {name!r} must be {what}, not {value!r}")

    def _typed(self, name: str, default: Any, ok: Callable[[Any], bool], what: str) -> Any:
        value = self._take(name, default)
        if default is not _REQUIRED and value is default:
            return value
        if not ok(value):
            raise self._wrong(name, value, what)
        return value

    def uint(self, name: str, default: Any = _REQUIRED) -> Any:
        return self._typed(name, default, lambda v: type(v) is int and 0 <= v < 1 << 64, "an unsigned 64-bit integer")

    def seconds(self, name: str, default: Any = _REQUIRED) -> Any:
        return self._typed(name, default, lambda v: type(v) in (int, float) and 0 <= v < 3600,
                           "a number of seconds below 3600")

    def text(self, name: str, default: Any = _REQUIRED) -> Any:
        return self._typed(name, default, lambda v: isinstance(v, str), "a string")

    def flag(self, name: str, default: Any = _REQUIRED) -> Any:
        return self._typed(name, default, lambda v: isinstance(v, bool), "true or false")

    def items(self, name: str) -> list[Any]:
        value = self._take(name, _REQUIRED)
        if not isinstance(value, list):
            raise self._wrong(name, value, "a list")
        return value

    def fd(self, name: str, *, nullable: bool = False) -> int | None:
        value = self._take(name, _REQUIRED)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(name, value, "the index of a passed fd" + (" or null" if nullable else ""))
        return self._fds[value]

    def hex(self, name: str) -> bytes:
        value = self.text(name)
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise self._wrong(name, value, "hex bytes") from None

    def document(self, name: str) -> Any:
        """An argument of any JSON type, checked by its reader (a migration state has a schema of its own)."""
        return self._take(name, _REQUIRED)

    def done(self) -> None:
        if self._raw:
            raise ProtocolError(f"{self.op}: unknown argument(s) {', '.join(map(repr, sorted(self._raw)))}")



# ---------------------------------------------------------------------------- the daemon
@dataclass
class Connection:
    peer: Peer
    sessions: set[int] = field(default_factory=set)
    domains: set[str] = field(default_factory=set)


@dataclass
class Totals:
    requests: int = 0
    errors: int = 0
    clients_served: int = 0
    sessions_opened: int = 0
    clients_failed: int = 0  # connections ended by a bug in the daemon (logged with its traceback)


Handler = Callable[["Daemon", Connection, Args], Awaitable[tuple[dict[str, Any], list[int]] | dict[str, Any]]]
OPS: dict[str, Handler] = {}


def op(name: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        OPS[name] = handler
        return handler
    return register


class Daemon:
    def __init__(self, config: Config, client_gid: int | None = None):
        self.config = config
        self.started = time.time()
        self.sessions: dict[int, Session | NetSession] = {}
        self.domains: dict[str, Domain] = {}
        self.connections: set[int] = set()
        self.totals = Totals()
        self.closed = Counters()  # what sessions that have closed did: the daemon's counters never go down
        # Memory a closed session could not close (still mapped: a bug); kept open, never freed under a device.
        self.unreleased: list[MemoryRegion] = []
        self._numbers = itertools.count(1)
        self._opening: set[str] = set()
        self.reconciled: dict[str, Any] | None = None
        self._client_gid = client_gid
        self._sending: set[trio.CancelScope] = set()  # replies being sent
        self.devices = DeviceListing()
        self.stopping = False

    def use(self, config: Config, client_gid: int | None = None) -> None:
        """Take a (re)loaded configuration and its group's gid (client_gid_of): the client group and log
        level now; the socket only at the next start."""
        if config.socket != self.config.socket:
            log.warning("config.socket_unchanged", socket=str(self.config.socket), wanted=str(config.socket),
                        reason="the listening socket changes at the next start")
            config = dataclasses.replace(config, socket=self.config.socket)
        if log_level(config) != log_level(self.config):
            vdpad_log.configure(log_level(config))
        self.config, self._client_gid = config, client_gid

    async def reconcile(self) -> None:
        """Create the configured devices that are missing, report the others; never one a session uses."""
        in_use = {s.device for s in self.sessions.values()} | self._opening
        try:
            report = await aio.run(reconcile, self.config.devices, in_use)
        except OSError as error:  # no vdpa netlink family: nothing can be created now
            log.error("reconcile.failed", error=str(error))
            self.reconciled = {"error": str(error)}
            return
        finally:
            self.devices.changed()
        self.reconciled = report.as_dict()

    # -- authorization --------------------------------------------------------------------
    def authorize(self, peer: Peer) -> None:
        if peer.uid == 0:
            return
        group, gid = self.config.group, self._client_gid
        if gid is not None and (peer.gid == gid or gid in peer.groups):
            return
        allowed = f"root or members of group {group!r}" if group else "root only (no client group configured)"
        raise Unauthorized(errno.EACCES, f"{peer} may not use vdpad: {allowed}")

    def owned(self, conn: Connection, number: int, op: str | None = None) -> Session:
        """Session `number` of `conn`: a vhost-vdpa one when `op` needs one (see owned_any)."""
        session = self.owned_any(conn, number)
        if op is not None and not isinstance(session, Session):
            raise ProtocolError(f"{op}: session {number} is a {session.device} session; {op} needs a vhost-vdpa "
                                "one (a vhost core device translates through its domain)")
        return session

    def owned_any(self, conn: Connection, number: int) -> Session | NetSession:
        session = self.sessions.get(number)
        if session is None:
            raise NotFound(errno.ENOENT, f"no session {number}")
        if number not in conn.sessions:
            raise Unauthorized(errno.EPERM, f"session {number} belongs to another client ({session.owner}); "
                                            "a client acts only on sessions it opened")
        return session

    def owned_domain(self, conn: Connection, name: str) -> Domain:
        domain = self.domains.get(name)
        if domain is None:
            raise NotFound(errno.ENOENT, f"no domain {name!r} (domains: {', '.join(sorted(self.domains)) or 'none'})")
        if name not in conn.domains:
            raise Unauthorized(errno.EPERM, f"domain {name} belongs to another client ({domain.owner}); "
                                            "a client acts only on domains it created")
        return domain

    def session_of_device(self, device: str) -> Session | None:
        return next((s for s in self.sessions.values() if isinstance(s, Session) and s.device == device), None)

    async def close_session(self, conn: Connection, number: int) -> None:
        """Close a session of `conn`; what fails to close is logged (Session.close lets go of the rest)."""
        session = self.sessions.pop(number)
        conn.sessions.discard(number)
        for name, value in vars(session.counters).items():  # booked now: a status meanwhile counts them once
            setattr(self.closed, name, getattr(self.closed, name) + value)
        domains = list(self.domains.values())

        def close() -> list[MemoryRegion]:
            for domain in domains:  # the device lets go of the domain's memory as its fd closes
                try:
                    domain.forget(session)
                except Exception:  # noqa: BLE001 - a bug; the session still closes
                    log.exception("domain.forget_failed", session=number, domain=domain.name)
            return session.close()

        with trio.CancelScope(shield=True):
            try:
                self.unreleased += await session.in_lane(close)
            except Exception:  # noqa: BLE001 - a bug; the daemon and every other session go on
                log.exception("session.close_failed", session=number, device=session.device)
        self.status_changed()

    async def close_domain(self, conn: Connection, name: str) -> None:
        """Detach everything from a domain of `conn` and close its memory (what stays mapped is kept open)."""
        domain = self.domains.pop(name)
        conn.domains.discard(name)
        with trio.CancelScope(shield=True):
            try:
                self.unreleased += await domain.close()
            except Exception:  # noqa: BLE001 - a bug; the daemon and every other domain go on
                log.exception("domain.close_failed", domain=name)

    def status_line(self) -> str:
        return f"{len(self.sessions)} session(s), {len(self.connections)} client(s)"

    def status_changed(self) -> None:
        systemd.notify(status=self.status_line())

    # -- one connection -------------------------------------------------------------------
    async def serve_connection(self, sock: trio.socket.SocketType) -> None:
        """Serve one client until it goes; a bug met on its behalf ends its connection, never the daemon."""
        try:
            await self._serve_connection(sock)
        except Exception:  # noqa: BLE001 - its sessions were closed on the way out
            self.totals.clients_failed += 1
            log.exception("client.failed")

    async def _serve_connection(self, sock: trio.socket.SocketType) -> None:
        conn: Connection | None = None
        try:
            peer = peer_of(sock)
            try:
                self.authorize(peer)
            except Unauthorized as refusal:
                log.warning("client.refused", pid=peer.pid, uid=peer.uid, reason=str(refusal))
                with trio.move_on_after(REPLY_TIMEOUT):
                    try:
                        await wire.asend(sock, wire.encode({"v": VERSION, "id": None, "ok": False,
                                                            "error": error_reply(refusal)}))
                    except OSError:  # gone before it heard why (EPIPE): nothing to tell
                        pass
                return
            conn = Connection(peer)
            self.connections.add(id(conn))
            self.totals.clients_served += 1
            self.status_changed()
            log.debug("client.connected", pid=peer.pid, uid=peer.uid)
            while await self._one_request(sock, conn):
                pass
        finally:
            if conn is not None:
                for number in sorted(conn.sessions):
                    await self.close_session(conn, number)
                for name in sorted(conn.domains):  # after the sessions: no device maps their memory now
                    await self.close_domain(conn, name)
                self.connections.discard(id(conn))
                self.status_changed()
                log.debug("client.gone", pid=conn.peer.pid)
            sock.close()

    async def _one_request(self, sock: trio.socket.SocketType, conn: Connection) -> bool:
        """Read, run and answer one request; False when the client has gone (or must go)."""
        try:
            received = await wire.areceive(sock)
        except ProtocolError as error:
            received, refused = None, error
        except OSError:  # ECONNRESET: the client is gone
            return False
        else:
            if received is None:
                return False
            refused = None
        if refused is not None:
            reply, fds = self._error(None, "?", refused), []
        else:
            message, passed = received
            with passed, trio.CancelScope(shield=True):  # a request that started runs to its end
                reply, fds = await self.run(conn, message, passed)
        try:
            data = wire.encode(reply)
        except ProtocolError as error:  # a reply over the limit: the client hears why, and stays
            data, fds = wire.encode(self._error(reply["id"], "reply", error, conn)), []
        # Shielded too: a request that ran when SIGTERM came is answered (stop() shortens the wait).
        with trio.CancelScope(shield=True) as sending:
            sending.deadline = trio.current_time() + (STOP_REPLY_TIMEOUT if self.stopping else REPLY_TIMEOUT)
            self._sending.add(sending)
            try:
                await wire.asend(sock, data, fds)
            except OSError as error:
                log.warning("client.dropped", pid=conn.peer.pid, reason=str(error))
                return False
            finally:
                self._sending.discard(sending)
        if sending.cancelled_caught:
            log.warning("client.dropped", pid=conn.peer.pid, reason="reply unread")
            return False
        return True

    def stop(self) -> None:
        """SIGTERM: replies still waiting for a deaf client's buffer wait no longer than STOP_REPLY_TIMEOUT."""
        self.stopping = True
        for sending in self._sending:
            sending.deadline = min(sending.deadline, trio.current_time() + STOP_REPLY_TIMEOUT)

    async def run(self, conn: Connection, message: dict[str, Any], fds: ReceivedFds) -> tuple[dict[str, Any], list[int]]:
        self.totals.requests += 1
        number = message.get("id")
        name = message.get("op")
        try:
            if message.get("v") != VERSION:
                raise ProtocolError(f"protocol version {message.get('v')!r} is not served; this daemon speaks {VERSION}")
            handler = OPS.get(name) if isinstance(name, str) else None
            if handler is None:
                raise ProtocolError(f"unknown op {name!r}; known: {', '.join(sorted(OPS))}")
            args = Args(name, message.get("args", {}), fds)
            answer = await handler(self, conn, args)
            result, passed = answer if isinstance(answer, tuple) else (answer, [])
            return {"v": VERSION, "id": number, "ok": True, "result": result}, passed
        except Exception as error:  # noqa: BLE001 - every failure becomes a reply; the daemon goes on
            return self._error(number, name, error, conn), []

    def _error(self, number: Any, name: Any, error: Exception, conn: Connection | None = None) -> dict[str, Any]:
        self.totals.errors += 1
        reply = error_reply(error)
        fields = {"op": str(name), "kind": reply["kind"], "error": reply["message"]}
        if conn is not None:
            fields["pid"] = conn.peer.pid
        if reply["kind"] == "internal":
            log.exception("request.failed", **fields)
        elif reply["kind"] == "unauthorized":
            log.warning("request.refused", **fields)
        else:  # the client has the reason; a driver's fallback (not_supported) is routine
            log.debug("request.refused", **fields)
        return {"v": VERSION, "id": number, "ok": False, "error": reply}


def peer_of(sock: trio.socket.SocketType) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 1024)
        groups = tuple(array.array("I", raw[: len(raw) - len(raw) % 4]))
    except OSError:  # ERANGE: more than 1024 groups; the primary one still counts
        groups = ()
    return Peer(pid, uid, gid, groups)


# ---------------------------------------------------------------------------- operations
@op("hello")
async def _hello(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    args.done()
    return {"version": VERSION, "server": f"vdpad {SERVER_VERSION}", "pid": os.getpid(),
            "peer": {"pid": conn.peer.pid, "uid": conn.peer.uid}}


@op("status")
async def _status(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    args.done()
    try:
        devices, unknown = await daemon.devices.records(), None
    except OSError as error:  # no vdpa module yet: the daemon's own figures still stand
        devices, unknown = None, str(error)
    else:
        in_use = {s.device: s.number for s in daemon.sessions.values()}
        devices = [{**record, "session": in_use.get(record["name"])} for record in devices]
    sessions = list(daemon.sessions.values())
    done = {name: value + sum(getattr(s.counters, name) for s in sessions)  # one step with the sessions' list
            for name, value in vars(daemon.closed).items() if name != "errors"}  # errors: the daemon's own
    # Off the loop: reading a map waits for the engine's lock, which a commit that pins pages holds long.
    mapped, pinned = await trio.to_thread.run_sync(
        lambda: (sum(s.mapped_bytes() for s in sessions if isinstance(s, Session)), vm_pinned()))
    counters = {**done, "bytes_mapped": mapped, "bytes_pinned": pinned, **vars(daemon.totals)}
    return {"version": SERVER_VERSION, "protocol": VERSION, "pid": os.getpid(),
            "uptime": round(time.time() - daemon.started, 3), "devices": devices, "devices_unknown": unknown,
            "sessions": len(sessions), "domains": len(daemon.domains), "clients": len(daemon.connections),
            "counters": counters,
            "reconciled": daemon.reconciled}


class DeviceListing:
    """The vdpa devices `status` lists: one netlink and sysfs walk (tens of ms under TCG) serves every status
    asked within MAX_AGE s, and while one runs the others wait for it rather than start their own. The
    daemon's own attach, detach and reconciliation make the next status walk again."""

    MAX_AGE = 1.0

    def __init__(self) -> None:
        self._walking = trio.Lock()
        self._records: list[dict[str, Any]] | None = None
        self._taken = 0.0
        self._changes = 0  # a walk that a change overtook is not kept

    def changed(self) -> None:
        self._records = None
        self._changes += 1

    async def records(self) -> list[dict[str, Any]]:
        async with self._walking:
            if self._records is None or trio.current_time() - self._taken > self.MAX_AGE:
                changes = self._changes
                records = await aio.run(_device_records)
                if changes == self._changes:
                    self._records, self._taken = records, trio.current_time()
                return records
            return self._records


def _device_records(nl: VdpaNetlink) -> list[dict[str, Any]]:
    records = []
    for device in nl.devices():
        bound = binding.binding_of(device.name)
        records.append({"name": device.name, "mgmtdev": device.mgmtdev, "driver": bound.driver,
                        "node": str(bound.node) if bound.node else None})
    return records


@op("device.attach")
async def _attach(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    name, mgmtdev = args.text("name"), args.text("mgmtdev")
    options = {"mac": args.text("mac", None), "mtu": args.uint("mtu", None), "max_vqp": args.uint("max_vqp", None),
               "features": args.uint("features", None)}
    driver = Driver(args.text("driver", Driver.VHOST_VDPA.value))
    timeout = args.seconds("timeout", binding.DEFAULT_TIMEOUT)
    args.done()
    lifecycle.check_attach(name, mgmtdev, **options)
    try:
        done = await aio.run(lifecycle.attach, name, mgmtdev, driver=driver, timeout=timeout, **options)
    finally:
        daemon.devices.changed()
    log.info("device.attached", device=name, mgmtdev=mgmtdev, pid=conn.peer.pid)
    return device_record(done.device, done.binding)


@op("device.detach")
async def _detach(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    name = args.text("name")
    args.done()
    if (session := daemon.session_of_device(name)) is not None:
        raise Busy(errno.EBUSY, f"device {name} is used by session {session.number} of {session.owner}: "
                                "it is detached once that session closes")
    try:
        await aio.run(lifecycle.detach, name)
    finally:
        daemon.devices.changed()
    log.info("device.detached", device=name, pid=conn.peer.pid)
    return {}


@op("session.open")
async def _open(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    device, persist = args.text("device"), args.flag("persist", True)
    if device == NET_DEVICE:
        return await _open_net(daemon, conn, args)
    args.done()
    if device.startswith("/"):
        device = await trio.to_thread.run_sync(device_of_node, device)
    held = daemon.session_of_device(device)
    if held is not None or device in daemon._opening:
        who = f"session {held.number} of {held.owner}" if held else "a session being opened"
        raise Busy(errno.EBUSY, f"device {device} is in use by {who}")
    number = next(daemon._numbers)
    daemon._opening.add(device)
    try:
        session = await trio.to_thread.run_sync(lambda: Session.open(number, conn.peer, device, persist=persist))
    finally:
        daemon._opening.discard(device)
    daemon.sessions[number] = session
    conn.sessions.add(number)
    daemon.totals.sessions_opened += 1
    daemon.status_changed()
    return await session.in_lane(session.info)


async def _open_net(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    """A vhost-net device of its own, backed by the tap the client passed (`tap`)."""
    tap = args.fd("tap")
    args.done()
    number = next(daemon._numbers)
    session = await trio.to_thread.run_sync(lambda: NetSession.open(number, conn.peer, tap))
    daemon.sessions[number] = session
    conn.sessions.add(number)
    daemon.totals.sessions_opened += 1
    daemon.status_changed()
    return session.info()


@op("session.list")
async def _list(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    args.done()
    sessions = list(daemon.sessions.values())
    return {"sessions": await trio.to_thread.run_sync(lambda: [s.describe() for s in sessions])}


@op("session.close")
async def _close(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    number = args.uint("session")
    args.done()
    daemon.owned_any(conn, number)
    await daemon.close_session(conn, number)
    return {}


@op("session.reset")
async def _reset(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    session = daemon.owned(conn, args.uint("session"), args.op)
    args.done()
    await session.in_lane(session.reset)
    return {"persistent": session.iotlb.persistent}


def _memory_holder(daemon: Daemon, conn: Connection, args: Args) -> tuple[MemoryHolder, Callable[[Callable[[], Any]], Awaitable[Any]]]:
    """What a memory op names, `session` or `domain`, and how its work runs: a session's in its lane, a domain's
    in a worker thread."""
    domain = args.text("domain", None)
    if domain is None:
        session = daemon.owned(conn, args.uint("session"), args.op)
        return session, session.in_lane
    if args.uint("session", None) is not None:
        raise ProtocolError(f"{args.op}: memory belongs to a session or to a domain, not both")
    return daemon.owned_domain(conn, domain), trio.to_thread.run_sync


@op("memory.register")
async def _register(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    holder, run = _memory_holder(daemon, conn, args)
    name, fd = args.text("name"), args.fd("fd")
    offset, size = args.uint("offset", 0), args.uint("size")
    args.done()
    region = await run(lambda: holder.register(name, fd, offset, size))
    return {"name": region.name, "size": region.size}


@op("memory.alloc")
async def _alloc(daemon: Daemon, conn: Connection, args: Args) -> tuple[dict[str, Any], list[int]]:
    holder, run = _memory_holder(daemon, conn, args)
    name, size = args.text("name"), args.uint("size")
    args.done()
    region = await run(lambda: holder.allocate(name, size))
    return {"name": region.name, "size": region.size, "fd": 0}, [region.fd]


@op("memory.release")
async def _release(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    holder, run = _memory_holder(daemon, conn, args)
    name = args.text("name")
    args.done()
    await run(lambda: holder.release(name))
    return {}


@op("iotlb.commit")
async def _commit(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    session = daemon.owned(conn, args.uint("session"), args.op)
    asid, allow_window = args.uint("asid", 0), args.flag("allow_window", False)
    ops = [_map_op(index, raw) for index, raw in enumerate(args.items("ops"))]
    args.done()
    plan = await session.in_lane(lambda: session.commit(asid, ops, allow_window))
    log.debug("iotlb.committed", session=session.number, device=session.device, asid=asid, op="iotlb.commit",
              messages=len(plan))
    return plan_record(plan)


def _map_op(index: int, raw: Any, op: str = "iotlb.commit") -> MapOp:
    where = f"{op} ops[{index}]"
    entry = Args(where, raw, ReceivedFds())
    kind = entry.text("op")
    if kind == "map":
        perm_name = entry.text("perm", "rw")
        if perm_name not in PERMS:
            raise ProtocolError(f"{where}: perm {perm_name!r} is not one of {', '.join(PERMS)}")
        made = MapOp("map", entry.uint("iova"), entry.uint("size"), entry.text("memory"), entry.uint("offset", 0),
                     PERMS[perm_name])
    elif kind == "unmap":
        made = MapOp("unmap", entry.uint("iova"), entry.uint("size"))
    else:
        raise ProtocolError(f"{where}: op {kind!r} is not map or unmap")
    entry.done()
    return made


@op("iotlb.show")
async def _show(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    device = args.text("device")
    asid, start, limit = args.uint("asid", None), args.uint("from", 0), args.uint("limit", SHOW_PAGE)
    args.done()
    if not 0 < limit <= SHOW_PAGE_MAX:
        raise ProtocolError(f"iotlb.show: limit {limit} is not between 1 and {SHOW_PAGE_MAX}")
    session = daemon.session_of_device(device) or next(
        (s for s in daemon.sessions.values() if isinstance(s, Session) and s.dev.path == device), None)
    if session is None:
        raise NotFound(errno.ENOENT, f"no session holds device {device}: its IOTLB is not the daemon's")
    if asid is not None and asid >= session.iotlb.as_num:
        raise ProtocolError(f"iotlb.show: asid {asid} is not below the device's {session.iotlb.as_num} address spaces")

    def page(limit: int) -> tuple[list[dict[str, Any]], int]:
        spaces = session.show_iotlb(asid, start, limit)
        return spaces, len(json.dumps(spaces))

    while True:  # a page of long memory names may not fit the message: fewer entries until it does
        spaces, size = await trio.to_thread.run_sync(page, limit)
        if limit == 1 or size < MAX_MESSAGE - 1024:  # room for the rest of the reply
            return {"session": session.number, "device": session.device, "node": session.dev.path, "spaces": spaces}
        limit //= 2


@op("group.set_asid")
async def _group(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    session = daemon.owned(conn, args.uint("session"), args.op)
    group, asid = args.uint("group"), args.uint("asid")
    args.done()
    await session.in_lane(lambda: session.iotlb.set_group_asid(group, asid))
    return {}


def _device_op(name: str) -> Handler:
    spec = DEVICE_CALLS[name]

    async def call(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
        session = daemon.owned_any(conn, args.uint("session"))
        values: dict[str, Any] = {}
        for arg in spec.args:
            if arg in BOOL_ARGS:
                values[arg] = args.flag(arg)
            elif arg in FD_ARGS:
                values[arg] = args.fd(arg, nullable=True)
            elif arg in BYTES_ARGS:
                values[arg] = args.hex(arg)
            else:
                values[arg] = args.uint(arg)
        args.done()
        result = await session.in_lane(lambda: session.call(name, values))
        log.debug("device.call", session=session.number, device=session.device, op=name)
        if spec.result == "bytes":
            return {"value": result.hex()}
        if spec.result == "range":
            return {"value": {"first": result.first, "last": result.last}}
        return {"value": None if result is None else int(result)}

    return call


for _name in DEVICE_CALLS:
    OPS[f"device.{_name}"] = _device_op(_name)


# -- migration (docs/migration.md): save a running device's state, load it on a reset one
@op("session.save")
async def _save(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    session = daemon.owned(conn, args.uint("session"), args.op)
    args.done()
    if session.domains:
        (asid, name), = session.domains.items()
        raise ProtocolError(f"session.save: AS {asid} of session {session.number} follows domain {name}, whose "
                            "memory a load could not name: detach it first (migrating domains is not supported)")
    state = await session.in_lane(lambda: switchover.save(session))
    return {"state": state.to_json()}


@op("session.load")
async def _load(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    session = daemon.owned(conn, args.uint("session"), args.op)
    state = DeviceState.from_json(args.document("state"), session.device)
    args.done()
    await session.in_lane(lambda: switchover.load(session, state))
    return {}


@op("session.migrate")
async def _migrate(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    """Save `session`, load the state on session `to` (both this client's, on this daemon): one request
    inside the downtime instead of two; if the load fails, the source is resumed here, before the reply."""
    source, destination = daemon.owned(conn, args.uint("session"), args.op), daemon.owned(conn, args.uint("to"), args.op)
    args.done()
    if source is destination:
        raise ProtocolError("session.migrate: `to` is the session itself (a restart in place is save, reset, load)")
    state = await source.in_lane(lambda: switchover.save(source))
    try:
        await destination.in_lane(lambda: switchover.load(destination, state))
    except Exception as error:
        try:
            await source.in_lane(source.dev.resume)  # save refuses a device its client suspended
        except Exception as undo:  # noqa: BLE001 - the load's own error is the one to raise
            error.add_note(f"resuming the source {source.device} failed too: {undo}")
        else:
            error.add_note(f"the source {source.device} was resumed and carries on")
        raise
    return {"state": state.to_json()}


# -- vIOMMU domains (vdpad.service.domains)
@op("domain.create")
async def _domain_create(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    name = args.text("name")
    args.done()
    if name in daemon.domains:
        raise Busy(errno.EEXIST, f"domain {name!r} exists already (of {daemon.domains[name].owner})")
    daemon.domains[name] = Domain(name, conn.peer)
    conn.domains.add(name)
    return {"domain": name}


@op("domain.close")
async def _domain_close(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    name = args.text("name")
    args.done()
    daemon.owned_domain(conn, name)
    await daemon.close_domain(conn, name)
    return {}


@op("domain.list")
async def _domain_list(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    args.done()
    return {"domains": [domain.describe() for domain in list(daemon.domains.values())]}


@op("domain.show")
async def _domain_show(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    """A domain's entries from `from`, a page at a time (as iotlb.show), with what describes it."""
    name, start, limit = args.text("name"), args.uint("from", 0), args.uint("limit", SHOW_PAGE)
    args.done()
    if not 0 < limit <= SHOW_PAGE_MAX:
        raise ProtocolError(f"domain.show: limit {limit} is not between 1 and {SHOW_PAGE_MAX}")
    domain = daemon.domains.get(name)
    if domain is None:
        raise NotFound(errno.ENOENT, f"no domain {name!r} (domains: {', '.join(sorted(daemon.domains)) or 'none'})")
    (entries,), cut = page_of((domain.map.tree,), start, limit)
    return {**domain.describe(), "map": [mapping_record(m) for m in entries], "next": cut}


@op("domain.commit")
async def _domain_commit(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    domain = daemon.owned_domain(conn, args.text("name"))
    ops = [_map_op(index, raw, args.op) for index, raw in enumerate(args.items("ops"))]
    args.done()
    return await domain.commit(ops)


@op("domain.attach")
async def _domain_attach(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    domain = daemon.owned_domain(conn, args.text("name"))
    session, asid = daemon.owned_any(conn, args.uint("session")), args.uint("asid", 0)
    args.done()
    if isinstance(session, NetSession) and asid:
        raise ProtocolError(f"domain.attach: a {session.device} session has one address space, not asid {asid}")
    await domain.attach(session, asid)
    daemon.status_changed()
    return {}


@op("domain.detach")
async def _domain_detach(daemon: Daemon, conn: Connection, args: Args) -> dict[str, Any]:
    domain = daemon.owned_domain(conn, args.text("name"))
    session = daemon.owned_any(conn, args.uint("session"))
    args.done()
    await domain.detach(session)
    return {}


# ---------------------------------------------------------------------------- the loop
def bind_socket(path: Path) -> socket.socket:
    """A listening SOCK_SEQPACKET socket at `path`; a stale one is replaced, a live one refused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody answers: left by a daemon that died
        else:
            raise Busy(errno.EADDRINUSE, f"another daemon already answers on {path}")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind(str(path))
        os.chmod(path, 0o666)  # who may use the daemon is decided per client by SO_PEERCRED
        listener.listen(64)
    except BaseException:
        listener.close()
        raise
    return listener


async def _accept(daemon: Daemon, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
    while True:
        try:
            sock, _ = await listener.accept()
        except OSError as error:  # EMFILE and friends: back off, keep serving the connected
            log.warning("accept.failed", error=str(error))
            await trio.sleep(0.1)
            continue
        nursery.start_soon(daemon.serve_connection, sock)


async def _watchdog(interval: float) -> None:
    while True:
        systemd.notify(watchdog=True)
        await trio.sleep(interval)


async def main(config: Config, config_path: str | None = None, client_gid: int | None = None) -> None:
    daemon = Daemon(config, client_gid)
    inherited = systemd.listen_fds()
    listeners = inherited or [bind_socket(config.socket)]
    bound_here = not inherited
    where = ", ".join(str(s.getsockname()) for s in listeners)
    try:
        async with trio.open_nursery() as outer:
            connections_scope = trio.CancelScope()
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                if (interval := systemd.watchdog_interval()) is not None:
                    outer.start_soon(_watchdog, interval)
                if config.devices:  # before serving: a client that connects early waits for its devices
                    await daemon.reconcile()
                async with trio.open_nursery() as serving:
                    serving.start_soon(_serve_all, daemon, listeners, connections_scope)
                    log.info("daemon.ready", socket=where, pid=os.getpid(), activated=not bound_here)
                    systemd.notify(ready=True, status=daemon.status_line())
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            await _reload(daemon, config_path)
                            continue
                        log.info("daemon.stopping", signal=signal.Signals(signum).name)
                        systemd.notify(stopping=True, status="stopping: closing sessions")
                        daemon.stop()
                        connections_scope.cancel()
                        break
            outer.cancel_scope.cancel()
    finally:
        for listener in listeners:
            listener.close()
        if bound_here:
            config.socket.unlink(missing_ok=True)
    log.info("daemon.stopped")


async def _reload(daemon: Daemon, config_path: str | None) -> None:
    """SIGHUP: read the configuration again and reconcile; a bad file changes nothing."""
    systemd.notify(reloading=True, status="reloading the configuration")
    try:
        config, gid = await trio.to_thread.run_sync(lambda: (config := load(config_file(config_path)),
                                                             client_gid_of(config)))
        daemon.use(config, gid)
    except (ConfigError, KeyError) as error:
        log.error("daemon.reload_refused", error=str(error), config=config_path)
    else:
        log.info("daemon.reloaded", config=config_path, devices=len(config.devices))
        await daemon.reconcile()
    systemd.notify(ready=True, status=daemon.status_line())


async def _serve_all(daemon: Daemon, listeners: list[socket.socket], scope: trio.CancelScope) -> None:
    with scope:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept, daemon, trio.socket.from_stdlib_socket(listener), nursery)


def client_gid_of(config: Config) -> int | None:
    """The configured client group's gid (a name service lookup: it may block, so never on the loop)."""
    return grp.getgrnam(config.group).gr_gid if config.group else None


def log_level(config: Config) -> str:
    """$VDPAD_LOG wins over the file's log_level."""
    return os.environ.get("VDPAD_LOG") or config.log_level


def serve(config_path: str | None = None, socket_path: str | None = None) -> None:
    """Run the daemon until SIGTERM or SIGINT. Without `config_path`, DEFAULT_CONFIG when it exists.
    `socket_path` (--socket, $VDPAD_SOCKET) wins over the file's."""
    config = load(config_file(config_path))
    if socket_path is not None:
        config = dataclasses.replace(config, socket=Path(socket_path))
    vdpad_log.configure(log_level(config))
    trio.run(main, config, config_path, client_gid_of(config))


def config_file(config_path: str | None) -> str | None:
    """--config, else DEFAULT_CONFIG if it exists now (a reload sees one made since the start), else None."""
    if config_path is None and DEFAULT_CONFIG.exists():
        return str(DEFAULT_CONFIG)
    return config_path


__all__ = ["OPS", "Daemon", "bind_socket", "main", "serve", "error_kind"]
