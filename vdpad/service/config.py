"""The daemon's configuration: a TOML file (docs/config.md), read and checked whole before anything is done.

Every problem is a ConfigError naming the file, the key (`device[1].mtu`)
and what is wrong with it; a typo in a key is an error, not a default. The
rules a device's attributes follow are those of `vdpad attach`
(vdpad.mgmt.model, vdpad.device.flags), so a file that loads asks the kernel
for nothing the attach path would refuse before sending.
"""

from __future__ import annotations

import difflib
import grp
import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from vdpad.device.errors import InvalidArgument
from vdpad.device.flags import parse_features
from vdpad.mgmt import model
from vdpad.mgmt.binding import Driver

DEFAULT_SOCKET = Path("/run/vdpad/control.sock")
DEFAULT_CONFIG = Path("/etc/vdpad/vdpad.toml")  # read by `vdpad serve` without --config, when it exists
LOG_LEVELS = ("debug", "info", "warning", "error")
SUN_PATH_MAX = 107  # bytes of a Unix socket path: sockaddr_un.sun_path is 108, NUL included


class ConfigError(ValueError):
    """The configuration file cannot be used; nothing was done."""

    def __init__(self, source: str, key: str | None, problem: str):
        self.source, self.key, self.problem = source, key, problem
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")


@dataclass(frozen=True)
class DeviceSpec:
    """A device the daemon makes when it is missing: `vdpad attach`'s arguments."""

    name: str
    mgmtdev: str
    mac: str | None = None  # canonical lower-case form
    mtu: int | None = None
    max_vqp: int | None = None
    features: int | None = None
    driver: Driver = Driver.VHOST_VDPA


@dataclass(frozen=True)
class Config:
    socket: Path = DEFAULT_SOCKET
    group: str | None = None  # clients in this group may connect (root always may)
    log_level: str = "info"
    devices: tuple[DeviceSpec, ...] = ()


def load(path: str | os.PathLike[str] | None) -> Config:
    """The configuration in the file at `path`; None: the defaults."""
    if path is None:
        return Config()
    source = os.fspath(path)
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise ConfigError(source, None, f"cannot read it: {error.strerror}") from None
    return loads(data, source)


def loads(data: bytes | str, source: str = "<config>") -> Config:
    """The configuration in `data`, TOML; `source` names it in errors."""
    try:
        text = data.decode() if isinstance(data, bytes) else data
        table = tomllib.loads(text)
    except UnicodeDecodeError as error:
        raise ConfigError(source, None, f"not UTF-8 text (byte {error.start}): TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as error:  # its text gives the line and column
        raise ConfigError(source, None, f"not valid TOML: {error}") from None
    return _Reader(source).config(table)


_TOP_KEYS = ("socket", "group", "log_level", "device")
_DEVICE_KEYS = tuple(f.name for f in fields(DeviceSpec))
_REQUIRED_DEVICE_KEYS = ("name", "mgmtdev")


class _Reader:
    """Reads one parsed file; each error names the file and the key."""

    def __init__(self, source: str):
        self.source = source

    def error(self, key: str | None, problem: str) -> ConfigError:
        return ConfigError(self.source, key, problem)

    def config(self, table: dict[str, Any]) -> Config:
        self.no_unknown_keys(table, _TOP_KEYS, "")
        defaults = Config()
        socket = self.socket(table.get("socket", str(defaults.socket)))
        group = self.group(table.get("group"))
        log_level = self.log_level(table.get("log_level", defaults.log_level))
        devices = table.get("device", [])
        if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
            raise self.error("device", "must be an array of tables: write each device as a [[device]] section")
        specs = tuple(self.device(f"device[{i}]", d) for i, d in enumerate(devices))
        self.no_duplicates(specs)
        return Config(socket, group, log_level, specs)

    # -- checks -----------------------------------------------------------------------
    def no_unknown_keys(self, table: dict[str, Any], known: tuple[str, ...], prefix: str) -> None:
        for key in table:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(known)}"
                raise self.error(f"{prefix}{key}", f"unknown key{hint}")

    def typed(self, key: str, value: Any, kind: type) -> Any:
        # TOML booleans are Python ints: `mtu = true` must not pass for 1.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            what = {str: "a string", int: "an integer"}[kind]
            raise self.error(key, f"must be {what}, not {_toml_type(value)} ({value!r})")
        return value

    def socket(self, value: Any) -> Path:
        text = self.typed("socket", value, str)
        if "\0" in text:
            raise self.error("socket", "a path cannot contain a NUL character")
        path = Path(text)
        if not path.is_absolute():
            raise self.error("socket", f"{text!r} is not an absolute path")
        if len(os.fsencode(text)) > SUN_PATH_MAX:
            raise self.error("socket", f"{text!r} is longer than a Unix socket path may be ({SUN_PATH_MAX} bytes)")
        return path

    def group(self, value: Any) -> str | None:
        if value is None:
            return None
        name = self.typed("group", value, str)
        try:
            grp.getgrnam(name)
        except KeyError:
            raise self.error("group", f"no group named {name!r} on this system") from None
        return name

    def log_level(self, value: Any) -> str:
        level = self.typed("log_level", value, str).lower()
        if level not in LOG_LEVELS:
            raise self.error("log_level", f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
        return level

    def device(self, where: str, table: dict[str, Any]) -> DeviceSpec:
        self.no_unknown_keys(table, _DEVICE_KEYS, f"{where}.")
        for key in _REQUIRED_DEVICE_KEYS:
            if key not in table:
                raise self.error(f"{where}.{key}", "missing: a device needs a name and a mgmtdev")
        name = self.typed(f"{where}.name", table["name"], str)
        with self.refusal(f"{where}.name"):
            model.check_name("attach", name)
        mgmtdev = self.typed(f"{where}.mgmtdev", table["mgmtdev"], str)
        with self.refusal(f"{where}.mgmtdev"):
            model.split_handle("attach", mgmtdev)
        spec: dict[str, Any] = {}
        if "mac" in table:
            with self.refusal(f"{where}.mac"):
                spec["mac"] = model.parse_mac("attach", name, self.typed(f"{where}.mac", table["mac"], str))
        for key, check in (("mtu", model.check_mtu), ("max_vqp", model.check_max_vqp)):
            if key in table:
                with self.refusal(f"{where}.{key}"):
                    spec[key] = check("attach", name, self.typed(f"{where}.{key}", table[key], int))
        if "features" in table:
            spec["features"] = self.features(f"{where}.features", name, table["features"])
        if "driver" in table:
            spec["driver"] = self.driver(f"{where}.driver", table["driver"])
        return DeviceSpec(name, mgmtdev, **spec)

    def features(self, key: str, device: str, value: Any) -> int:
        if isinstance(value, str):
            with self.refusal(key):
                return parse_features(value)
        with self.refusal(key):
            return model.check_features("attach", device, self.typed(key, value, int))

    def driver(self, key: str, value: Any) -> Driver:
        text = self.typed(key, value, str)
        try:
            return Driver(text)
        except ValueError:
            raise self.error(key, f"{text!r} is not one of {', '.join(d.value for d in Driver)}") from None

    def no_duplicates(self, specs: tuple[DeviceSpec, ...]) -> None:
        first: dict[str, int] = {}
        for index, spec in enumerate(specs):
            if spec.name in first:
                raise self.error(f"device[{index}].name",
                                 f"{spec.name!r} is already the name of device[{first[spec.name]}]")
            first[spec.name] = index

    @contextmanager
    def refusal(self, key: str) -> Iterator[None]:
        """The attach path's refusal of a value (InvalidArgument, ValueError) as a ConfigError for `key`."""
        try:
            yield
        except ConfigError:
            raise
        except ValueError as error:
            problem = error.problem if isinstance(error, InvalidArgument) else str(error)
            raise self.error(key, problem) from None


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}.get(
        type(value), type(value).__name__)
