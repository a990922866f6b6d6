"""What the management commands decide without a kernel: bad input, exit codes, how output looks."""

from __future__ import annotations

import errno
import time

import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from vdpad.cli import main
from vdpad.cli.output import EXIT_CODES, exit_code, fields, table
from vdpad.device.errors import ENOTSUPP, InvalidArgument, NotSupportedError
from vdpad.mgmt import errors
from vdpad.mgmt.binding import wait_until


@pytest.mark.parametrize("args, text", [
    (["--mac", "02:00:00:00:00"], "mac='02:00:00:00:00'"),
    (["--mac", "ff:ff:ff:ff:ff:ff"], "multicast"),
    (["--mtu", "67"], "mtu=67 is outside 68-65535"),
    (["--max-vqp", "0"], "max_vqp=0"),
    (["--features", "0x1" + "0" * 16], "does not fit in 64 bits"),
    (["--features", "lots"], "unknown feature 'lots'"),
    (["--driver", "vfio"], "'vfio' is not one of"),
])
def test_bad_attach_input_exits_2_before_any_request(args, text):
    with capture_logs() as events:
        result = CliRunner().invoke(main, ["attach", "n0", "-m", "vdpasim_net", *args])
    assert result.exit_code == 2
    assert text in result.stderr and result.stdout == ""
    assert not [e for e in events if e["event"] in ("netlink", "sysfs")]


@pytest.mark.parametrize("name", ["a/b", "", "with space"])
def test_bad_device_names_exit_2(name):
    result = CliRunner().invoke(main, ["attach", name, "-m", "vdpasim_net"])
    assert result.exit_code == 2 and "device name" in result.stderr


def test_features_take_any_base():
    result = CliRunner().invoke(main, ["attach", "n0", "-m", "/", "--features", "0b101"])
    assert result.exit_code == 2 and "NAME or BUS/NAME" in result.stderr  # got past --features


def test_help_documents_every_exit_code():
    out = CliRunner().invoke(main, ["--help"]).stdout
    for code, meaning in EXIT_CODES:
        assert f"{code}  {meaning}" in out


@pytest.mark.parametrize("error, code", [
    (InvalidArgument("op", "d", "bad"), 2),
    (errors.NotFound(errno.ENODEV, "x"), 3),
    (errors.AlreadyExists(errno.EEXIST, "x"), 4),
    (errors.PermissionDenied(errno.EPERM, "x"), 5),
    (PermissionError(errno.EACCES, "x"), 5),
    (errors.NotSupported(errno.EOPNOTSUPP, "x"), 6),
    (errors.ModuleMissing("vdpa", "x"), 6),
    (errors.Busy(errno.EBUSY, "x"), 7),
    (errors.WaitTimeout(errno.ETIMEDOUT, "x"), 8),
    (NotSupportedError("SUSPEND", "/dev/vhost-vdpa-0", errno=errno.EOPNOTSUPP), 6),
    (NotSupportedError("GET_VRING_SIZE", "/dev/vhost-vdpa-0", errno=errno.ENOTTY), 6),
    (OSError(ENOTSUPP, "cannot open /dev/vhost-vdpa-0: not supported"), 6),
    (errors.MgmtError(errno.EAGAIN, "x"), 1),
    (OSError(errno.EIO, "x"), 1),
])
def test_exit_codes(error, code):
    assert exit_code(error) == code


@pytest.mark.parametrize("code, cls", [
    (errno.ENODEV, errors.NotFound), (errno.EEXIST, errors.AlreadyExists), (errno.EPERM, errors.PermissionDenied),
    (errno.EOPNOTSUPP, errors.NotSupported), (errno.EAGAIN, errors.MgmtError),
])
def test_refusals_keep_the_kernels_words(code, cls):
    error = errors.refused(code, "DEV_NEW n0 on vdpasim_net", "vdpa: Fail to find the specified device.")
    assert type(error) is cls and error.errno == code
    assert str(error) == f"DEV_NEW n0 on vdpasim_net: vdpa: Fail to find the specified device ({errno.errorcode[code]})"


def test_a_missing_module_says_what_to_load():
    error = errors.ModuleMissing("vdpa_sim_blk", "management device vdpasim_blk is not registered")
    assert str(error) == ("management device vdpasim_blk is not registered: "
                          "load the kernel module (modprobe vdpa_sim_blk)")


def test_table_aligns_and_marks_missing_values():
    rows = [{"name": "vdpa0", "node": "/dev/vhost-vdpa-0", "up": True},
            {"name": "a-longer-name", "node": None, "up": False}]
    assert table(rows, [("name", "NAME"), ("node", "NODE"), ("up", "UP")]).splitlines() == [
        "NAME           NODE               UP",
        "vdpa0          /dev/vhost-vdpa-0  yes",
        "a-longer-name  -                  no",
    ]


def test_fields_align_keys():
    assert fields([("name", "vdpa0"), ("kernel_devices", ["eth0", "eth1"]), ("x", [])]).splitlines() == [
        "name            vdpa0", "kernel_devices  eth0 eth1", "x               -"]


def test_wait_until_names_what_did_not_appear():
    start = time.monotonic()
    with pytest.raises(errors.WaitTimeout, match="the node of x did not appear within 0.05 s"):
        wait_until(lambda: None, 0.05, "the node of x")
    assert time.monotonic() - start >= 0.05


def test_wait_until_returns_what_appeared():
    calls = iter([None, None, "here"])
    assert wait_until(lambda: next(calls), 1.0, "x") == "here"


def test_info_on_a_file_that_is_no_vhost_device_exits_6():
    """/dev/null answers every ioctl with ENOTTY: the device layer's NotSupportedError, exit 6 as documented."""
    result = CliRunner().invoke(main, ["info", "/dev/null"])
    assert (result.exit_code, result.stdout) == (6, "")
    assert result.stderr == "vdpad: SET_OWNER on /dev/null: not supported by this kernel\n"
