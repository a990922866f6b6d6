"""`vdpad serve`, and the commands that ask the daemon: `status`, `session list`, `iotlb show`, `domain list|show`."""

from __future__ import annotations

import click

from vdpad.cli.output import emit_json, fields, json_option, reports_errors, table
from vdpad.client import Client, DaemonUnavailable

socket_option = click.option("--socket", "socket_path", envvar="VDPAD_SOCKET", metavar="PATH",
                             help="the daemon's control socket [default: /run/vdpad/control.sock; env VDPAD_SOCKET]")


def daemon_client(socket_path: str | None) -> Client | None:
    """A connection to the daemon when one answers on the socket; None: do it in-process."""
    try:
        return Client(socket_path)
    except DaemonUnavailable:
        return None


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="TOML configuration (docs/config.md)")
@socket_option
@reports_errors
def serve(config_path: str | None, socket_path: str | None) -> None:
    """Run the daemon: own devices on behalf of clients on the control socket."""
    from vdpad.service.server import serve as run
    run(config_path, socket_path)


@click.command()
@socket_option
@json_option
@reports_errors
def status(socket_path: str | None, as_json: bool) -> None:
    """The daemon's version, uptime, devices, sessions and counters."""
    with Client(socket_path) as client:
        record = client.status()
    if as_json:
        emit_json(record)
        return
    click.echo(fields([("version", record["version"]), ("pid", record["pid"]), ("uptime", f"{record['uptime']:.0f} s"),
                       ("sessions", record["sessions"]), ("domains", record["domains"]),
                       ("clients", record["clients"])]))
    click.echo(fields(sorted(record["counters"].items())))
    if record["devices_unknown"]:
        click.echo(f"devices: unknown ({record['devices_unknown']})")
    elif record["devices"]:
        click.echo()
        click.echo(table(record["devices"], [("name", "DEVICE"), ("mgmtdev", "MGMTDEV"), ("driver", "DRIVER"),
                                             ("node", "NODE"), ("session", "SESSION")]))


@click.group()
def session() -> None:
    """Sessions the daemon holds for its clients."""


@session.command("list")
@socket_option
@json_option
@reports_errors
def session_list(socket_path: str | None, as_json: bool) -> None:
    """Every session: its device, owner, memory, mapped bytes and counters."""
    with Client(socket_path) as client:
        sessions = client.sessions()
    if as_json:
        emit_json(sessions)
        return
    rows = [{**s, "pid": s["owner"]["pid"], "uid": s["owner"]["uid"],
             "memory": ",".join(m["name"] for m in s["memory"]), "commits": s["counters"]["commits"]}
            for s in sessions]
    click.echo(table(rows, [("session", "SESSION"), ("device", "DEVICE"), ("node", "NODE"), ("pid", "PID"),
                            ("uid", "UID"), ("memory", "MEMORY"), ("mapped", "MAPPED"), ("commits", "COMMITS")]))


@click.group()
def iotlb() -> None:
    """The IOTLB of a device the daemon holds."""


@iotlb.command("show")
@click.argument("device")
@click.option("--asid", type=click.IntRange(min=0), help="one address space only")
@socket_option
@json_option
@reports_errors
def iotlb_show(device: str, asid: int | None, socket_path: str | None, as_json: bool) -> None:
    """The map the client asked for and the entries the kernel holds, per address space."""
    with Client(socket_path) as client:
        shown = client.iotlb_show(device, asid)
    if as_json:
        emit_json(shown)
        return
    columns = [("iova", "IOVA"), ("size", "SIZE"), ("memory", "MEMORY"), ("offset", "OFFSET"), ("perm", "PERM")]
    for space in shown["spaces"]:
        click.echo(f"AS {space['asid']} of {shown['device']} ({shown['node']}, session {shown['session']}): "
                   f"{'in sync' if space['in_sync'] else 'NOT in sync'}"
                   f"{', initial map' if space['initial'] else ''}")
        for title, entries in (("map", space["map"]), ("kernel", space["kernel"])):
            click.echo(f"  {title}: {len(entries)} entries")
            if entries:
                rows = [{k: (f"{v:#x}" if isinstance(v, int) and k != "memory" else v) for k, v in e.items()}
                        for e in entries]
                click.echo("\n".join("    " + line for line in table(rows, columns).splitlines()))


@click.group()
def domain() -> None:
    """vIOMMU domains: address spaces that many devices translate through."""


def _misses(record: dict) -> str:
    misses = record["misses"]
    if not misses:
        return "-"
    return f"{misses['served'] + misses['late']} served, {misses['unmapped'] + misses['denied']} unanswered"


@domain.command("list")
@socket_option
@json_option
@reports_errors
def domain_list(socket_path: str | None, as_json: bool) -> None:
    """Every domain: its owner, entries, mapped bytes, attached sessions and the misses it answered."""
    with Client(socket_path) as client:
        domains = client.domains()
    if as_json:
        emit_json(domains)
        return
    rows = [{**d, "pid": d["owner"]["pid"], "sessions": ",".join(str(s["session"]) for s in d["devices"]) or "-",
             "misses": _misses(d)} for d in domains]
    click.echo(table(rows, [("domain", "DOMAIN"), ("pid", "PID"), ("entries", "ENTRIES"), ("mapped", "MAPPED"),
                            ("commits", "COMMITS"), ("sessions", "SESSIONS"), ("misses", "MISSES")]))


@domain.command("show")
@click.argument("name")
@socket_option
@json_option
@reports_errors
def domain_show(name: str, socket_path: str | None, as_json: bool) -> None:
    """A domain's map, its memory and the devices attached to it."""
    with Client(socket_path) as client:
        shown = client.domain_show(name)
    if as_json:
        emit_json(shown)
        return
    click.echo(fields([("domain", shown["domain"]), ("owner pid", shown["owner"]["pid"]),
                       ("entries", shown["entries"]), ("mapped", shown["mapped"]), ("commits", shown["commits"]),
                       ("memory", ", ".join(f"{m['name']} ({m['size']:#x})" for m in shown["memory"]) or "-"),
                       ("misses", _misses(shown))]))
    if shown["devices"]:
        click.echo()
        click.echo(table(shown["devices"], [("session", "SESSION"), ("device", "DEVICE"), ("kind", "KIND"),
                                            ("asid", "ASID")]))
    click.echo()
    rows = [{k: (f"{v:#x}" if isinstance(v, int) else v) for k, v in e.items()} for e in shown["map"]]
    click.echo(table(rows, [("iova", "IOVA"), ("size", "SIZE"), ("memory", "MEMORY"), ("offset", "OFFSET"),
                            ("perm", "PERM")]))
