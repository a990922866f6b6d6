"""The daemon's TOML configuration: what loads, and what each mistake is told as (file, key, problem)."""

from __future__ import annotations

import grp
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdpad.device.errors import InvalidArgument
from vdpad.device.flags import NetFeature, VirtioFeature
from vdpad.mgmt.binding import Driver
from vdpad.mgmt.lifecycle import check_attach
from vdpad.service.config import DEFAULT_SOCKET, Config, ConfigError, DeviceSpec, load, loads

DOCS = Path(__file__).parents[2] / "docs" / "config.md"
DEVICE = '[[device]]\nname = "net0"\nmgmtdev = "vdpasim_net"\n'


def test_no_file_means_the_defaults():
    assert load(None) == Config() == Config(DEFAULT_SOCKET, None, "info", ())
    assert DEFAULT_SOCKET == Path("/run/vdpad/control.sock")


def test_an_empty_file_means_the_defaults(tmp_path):
    (tmp_path / "empty.toml").write_text("")
    assert load(tmp_path / "empty.toml") == Config()


def test_every_key(tmp_path):
    group = grp.getgrgid(os.getgid()).gr_name
    path = tmp_path / "vdpad.toml"
    path.write_text(f"""
socket = "/run/other/vdpad.sock"
group = "{group}"
log_level = "DEBUG"

[[device]]
name = "net0"
mgmtdev = "vdpasim_net"
mac = "02:00:00:00:00:AB"
mtu = 9000
max_vqp = 2
features = "VERSION_1, ACCESS_PLATFORM,mac"
driver = "virtio_vdpa"

[[device]]
name = "blk0"
mgmtdev = "pci/0000:00:04.0"
features = 0x300000000
""")
    assert load(path) == Config(
        socket=Path("/run/other/vdpad.sock"), group=group, log_level="debug",
        devices=(
            DeviceSpec("net0", "vdpasim_net", mac="02:00:00:00:00:ab", mtu=9000, max_vqp=2,
                       features=VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM | NetFeature.MAC,
                       driver=Driver.VIRTIO_VDPA),
            DeviceSpec("blk0", "pci/0000:00:04.0", features=0x300000000, driver=Driver.VHOST_VDPA),
        ))


def test_the_documented_example_loads():
    example = re.search(r"```toml\n(.*?)```", DOCS.read_text(), re.S).group(1)
    group = re.search(r'^group = "(.*)"', example, re.M).group(1)
    try:
        grp.getgrnam(group)
    except KeyError:  # the example's group need not exist here: everything else must load
        example = example.replace(f'group = "{group}"', "")
    config = loads(example, "docs/config.md")
    assert config.devices and all(isinstance(d, DeviceSpec) for d in config.devices)


@pytest.mark.parametrize("text, key, problem", [
    ('sockt = "/run/x.sock"', "sockt", "unknown key (did you mean 'socket'?)"),
    ("debug = true", "debug", "unknown key; known keys: socket, group, log_level, device"),
    (DEVICE + "mgmdev = 'x'", "device[0].mgmdev", "unknown key (did you mean 'mgmtdev'?)"),
    ("socket = 1", "socket", "must be a string, not an integer (1)"),
    ('socket = "run/vdpad.sock"', "socket", "'run/vdpad.sock' is not an absolute path"),
    (f'socket = "/{"x" * 107}"', "socket", "longer than a Unix socket path may be (107 bytes)"),
    ('socket = "/run/a\\u0000b"', "socket", "NUL"),
    ('group = "no-such-group-here"', "group", "no group named 'no-such-group-here' on this system"),
    ("group = 0", "group", "must be a string, not an integer"),
    ('log_level = "verbose"', "log_level", "'verbose' is not one of debug, info, warning, error"),
    ('[device]\nname = "a"', "device", "must be an array of tables"),
    ('device = ["a"]', "device", "must be an array of tables"),
    ('[[device]]\nname = "net0"', "device[0].mgmtdev", "missing"),
    ('[[device]]\nmgmtdev = "vdpasim_net"', "device[0].name", "missing"),
    (DEVICE.replace('"net0"', '"a/b"'), "device[0].name", "without '/' or spaces"),
    (DEVICE.replace('"net0"', "7"), "device[0].name", "must be a string, not an integer (7)"),
    (DEVICE.replace('"vdpasim_net"', '"pci/"'), "device[0].mgmtdev", "a management device is NAME or BUS/NAME"),
    (DEVICE + 'mac = "02:00:00:00:00"', "device[0].mac", "is not six hex bytes"),
    (DEVICE + 'mac = "01:00:5e:00:00:01"', "device[0].mac", "is a multicast address"),
    (DEVICE + "mtu = 67", "device[0].mtu", "mtu=67 is outside 68-65535"),
    (DEVICE + "mtu = true", "device[0].mtu", "must be an integer, not a boolean (True)"),
    (DEVICE + "mtu = 1500.0", "device[0].mtu", "must be an integer, not a float (1500.0)"),
    (DEVICE + 'mtu = "1500"', "device[0].mtu", "must be an integer, not a string ('1500')"),
    (DEVICE + "max_vqp = 0", "device[0].max_vqp", "max_vqp=0 is outside 1-0x8000"),
    (DEVICE + 'features = "MQ"', "device[0].features", "write net.MQ or blk.MQ"),
    (DEVICE + 'features = "VERSION_2"', "device[0].features", "unknown feature 'VERSION_2'"),
    (DEVICE + "features = -1", "device[0].features", "does not fit in 64 bits"),
    (DEVICE + "features = [32]", "device[0].features", "must be an integer, not an array"),
    (DEVICE + 'driver = "vhost-vdpa"', "device[0].driver", "'vhost-vdpa' is not one of vhost_vdpa, virtio_vdpa"),
    (DEVICE + DEVICE.replace('"vdpasim_net"', '"vdpasim_blk"'), "device[1].name",
     "'net0' is already the name of device[0]"),
    (DEVICE + DEVICE.replace('"net0"', '"net1"') + DEVICE.replace('"net0"', '"net1"') + "mtu = 1",
     "device[2].mtu", "mtu=1 is outside"),
])
def test_a_mistake_names_the_file_the_key_and_the_problem(text, key, problem):
    with pytest.raises(ConfigError) as caught:
        loads(text, "/etc/vdpad/vdpad.toml")
    assert (caught.value.source, caught.value.key) == ("/etc/vdpad/vdpad.toml", key)
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"/etc/vdpad/vdpad.toml: {key}: ")


def test_a_toml_syntax_error_gives_its_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(DEVICE + "mtu = = 1500\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not valid TOML: ") + ".*line 4"):
        load(path)


def test_a_file_that_cannot_be_read_or_is_not_text(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'none.toml'}: cannot read it: No such file")):
        load(tmp_path / "none.toml")
    (tmp_path / "latin1.toml").write_bytes(b'log_level = "d\xe9bug"\n')
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load(tmp_path / "latin1.toml")


def test_a_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# -- the attach path's rules, from their one home ------------------------------------------
def _attach_refuses(**attrs) -> bool:
    try:
        check_attach("net0", "vdpasim_net", **attrs)
    except InvalidArgument:
        return True
    return False


def _loads_device(line: str) -> bool:
    try:
        loads(DEVICE + line)
    except ConfigError:
        return False
    return True


@given(key=st.sampled_from(["mtu", "max_vqp", "features"]), value=st.integers(min_value=-2, max_value=(1 << 64) + 2))
def test_a_number_loads_exactly_when_attach_takes_it(key, value):
    assert _loads_device(f"{key} = {value}") is not _attach_refuses(**{key: value})


@given(mac=st.text(alphabet="0123456789abcdefABCDEF:", max_size=18))
def test_a_mac_loads_exactly_when_attach_takes_it(mac):
    assert _loads_device(f'mac = "{mac}"') is not _attach_refuses(mac=mac)


def toml_string(text: str) -> str:
    """`text` as a TOML basic string: what is not printable, quotes and backslashes as \\U escapes."""
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08x}" for c in text) + '"'


@given(name=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=20))
def test_a_name_loads_exactly_when_attach_takes_it(name):
    try:
        check_attach(name, "vdpasim_net")
    except InvalidArgument:
        refused = True
    else:
        refused = False
    try:
        loaded = loads(f'[[device]]\nname = {toml_string(name)}\nmgmtdev = "vdpasim_net"\n')
    except ConfigError as error:
        assert refused and error.key == "device[0].name"
    else:
        assert not refused and loaded.devices[0].name == name


DEVICE_KEYS = {"name", "mgmtdev", "mac", "mtu", "max_vqp", "features", "driver"}


@given(key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(
    lambda k: k not in DEVICE_KEYS))
def test_no_unknown_device_key_passes(key):
    with pytest.raises(ConfigError) as caught:
        loads(DEVICE + f"{key} = 1")
    assert caught.value.key == f"device[0].{key}" and caught.value.problem.startswith("unknown key")


def test_the_service_layer_does_not_import_the_cli():
    code = ("import sys, vdpad.service.config, vdpad.service.reconcile\n"
            "print(sorted(m for m in sys.modules if m.startswith('vdpad.cli')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
