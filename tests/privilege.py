"""Run the vdpad CLI as an unprivileged user, from any checkout.

A test that shows what a user without root sees cannot simply exec the CLI as
that user: the checkout, its virtualenv and the interpreter may sit in
directories that uid 65534 cannot enter (/root is 0700, so is a `mktemp -d`).
So a child Python started as root imports everything the command needs,
then drops to uid/gid 65534 with no supplementary groups, in-process, keeping
only the capabilities asked for, runs the click command and exits with its
code. Nothing of the checkout's permissions changes.

    run_cli(["attach", "x", "-m", "vdpasim_net"], capabilities=["CAP_NET_ADMIN"])

An import attempted after the drop would fail on a 0700 checkout and pass on
a readable one, and a PermissionError inside the command reads as exit 5,
the very answer the tests look for. So every import after the drop is
refused: the child then exits with IMPORTED_AFTER_DROP and names the modules
(add them to PRELOAD).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.abc
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534  # uid and gid of nobody/nogroup
CAPABILITIES = {"CAP_NET_ADMIN": 12}  # linux/capability.h
IMPORTED_AFTER_DROP = 70  # EX_SOFTWARE: a bug of this module, not an answer of the CLI

# What the commands import on first use (after `vdpad.cli` and all it imports at once).
PRELOAD = (
    "vdpad.cli",
    "click._textwrap",  # help and usage errors
)

_PR_SET_KEEPCAPS = 8
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class _NoImports(importlib.abc.MetaPathFinder):
    """Refuses, and remembers, every import not already done."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    def find_spec(self, name, path, target=None):
        self.refused.append(name)
        raise ImportError(f"{name} imported after dropping privileges (tests.privilege.PRELOAD lacks it)")


def capability_mask(names: Iterable[str]) -> int:
    mask = 0
    for name in names:
        if name not in CAPABILITIES:
            raise ValueError(f"unknown capability {name!r}: known are {', '.join(CAPABILITIES)}")
        mask |= 1 << CAPABILITIES[name]
    return mask


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _status_caps() -> dict[str, int]:
    lines = Path("/proc/self/status").read_text().splitlines()
    return {k: int(v, 16) for k, _, v in (line.partition(":\t") for line in lines) if k.startswith("Cap")}


def drop_privileges(uid: int, gid: int, keep: int) -> None:
    """Become uid/gid with no groups; keep exactly the capabilities in the mask `keep` (effective and permitted)."""
    libc = ctypes.CDLL(None, use_errno=True)
    # Without KEEPCAPS, leaving uid 0 clears the permitted set.
    _check(libc.prctl(_PR_SET_KEEPCAPS, 1 if keep else 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if keep:
        header = _CapHeader(_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()  # bits 0-31, then 32-63
        for word in (0, 1):
            part = (keep >> (32 * word)) & 0xFFFFFFFF
            data[word].effective = data[word].permitted = part
        _check(libc.capset(ctypes.byref(header), data), "capset")
    caps = _status_caps()
    if (os.getresuid(), os.getresgid(), os.getgroups()) != ((uid,) * 3, (gid,) * 3, []) or \
            (caps["CapEff"], caps["CapPrm"], caps["CapAmb"]) != (keep, keep, 0):
        raise RuntimeError(f"privileges not dropped as asked: uid {os.getresuid()}, gid {os.getresgid()}, "
                           f"groups {os.getgroups()}, {caps}; wanted {uid}/{gid}, capabilities {keep:#x}")


def run_cli(args: Sequence[str], *, capabilities: Iterable[str] = (),
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`vdpad ARGS` as uid/gid 65534 with only `capabilities`; its exit code, stdout and stderr."""
    names = list(capabilities)
    capability_mask(names)  # an unknown name is refused here, not in the child
    return subprocess.run([sys.executable, "-m", "tests.privilege", *(f"--keep={name}" for name in names), "--", *args],
                          cwd=REPO, env=env, capture_output=True, text=True)


def run_as_nobody(function: str, args: Sequence[str], *, capabilities: Iterable[str] = (),
                  env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`module:function(args)` as uid/gid 65534: the module is imported as root first, the call made after."""
    names = list(capabilities)
    capability_mask(names)
    return subprocess.run([sys.executable, "-m", "tests.privilege", *(f"--keep={name}" for name in names),
                           f"--call={function}", "--", *args], cwd=REPO, env=env, capture_output=True, text=True)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.privilege", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="append", default=[], metavar="CAP_NAME",
                        help="a capability to keep (e.g. CAP_NET_ADMIN); none by default")
    parser.add_argument("--call", metavar="MODULE:FUNCTION",
                        help="call FUNCTION(args) of MODULE (imported before the drop) instead of the CLI")
    parser.add_argument("args", nargs="*", help="the vdpad command line, or the function's arguments")
    options = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("must start as root (it drops to uid 65534 itself)")
    keep = capability_mask(options.keep)
    for name in PRELOAD:
        importlib.import_module(name)
    from vdpad.cli import main as cli

    if options.call:
        module, _, function = options.call.partition(":")
        target = getattr(importlib.import_module(module), function)
    else:
        def target(args: Sequence[str]) -> None:
            cli.main(args=args, prog_name="vdpad")
    os.chdir("/")  # where any user may be
    drop_privileges(NOBODY, NOBODY, keep)
    guard = _NoImports()
    sys.meta_path.insert(0, guard)
    try:
        target(options.args)
        code = 0
    except SystemExit as exit:  # click's standalone mode always ends here
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except ImportError:
        if not guard.refused:
            raise
    sys.stdout.flush()
    if guard.refused:
        print(f"tests.privilege: imported after dropping privileges (add to PRELOAD): {', '.join(guard.refused)}",
              file=sys.stderr)
        return IMPORTED_AFTER_DROP
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
