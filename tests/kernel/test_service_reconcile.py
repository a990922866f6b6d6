"""Reconciling configured devices against vdpa_sim: made when missing, reported otherwise, never changed."""

from __future__ import annotations

import itertools
import json
import os

import pytest
from structlog.testing import capture_logs

from tests.sim import debug_logging
from vdpad.device import VhostVdpa
from vdpad.device.flags import parse_features
from vdpad.mgmt import NotFound, VdpaNetlink, attach, binding, detach
from vdpad.mgmt.binding import Driver
from vdpad.service.config import DeviceSpec
from vdpad.service.reconcile import Difference, Differing, Report, reconcile

pytestmark = pytest.mark.kernel

_numbers = itertools.count()
NET_FEATURES = parse_features("VERSION_1,ACCESS_PLATFORM,MAC,MTU")


@pytest.fixture
def names(nl):
    """A factory of fresh device names; whatever devices of these names exist after the test are detached."""
    made: list[str] = []

    def name() -> str:
        made.append(f"rc{os.getpid() % 1000}x{next(_numbers)}")
        return made[-1]

    yield name
    for device in made:
        try:
            detach(nl, device)
        except NotFound:
            pass


def device_names(nl: VdpaNetlink) -> set[str]:
    return {d.name for d in nl.devices()}


def test_missing_devices_are_made_bound_to_vhost_vdpa_and_a_second_run_makes_nothing(nl, names):
    net, blk = names(), names()
    specs = [DeviceSpec(net, "vdpasim_net", mac="02:00:00:00:30:01", mtu=9000, features=NET_FEATURES),
             DeviceSpec(blk, "vdpasim_blk")]
    with debug_logging(), capture_logs() as events:  # info events: below the default level
        report = reconcile(nl, specs, in_use=())
    assert report == Report(created=(net, blk))
    assert [(e["device"], e["action"]) for e in events if e["event"] == "reconcile.device"] == [
        (net, "created"), (blk, "created")]
    nodes = {name: binding.binding_of(name) for name in (net, blk)}
    assert all(b.driver == "vhost_vdpa" and b.node is not None and b.node.exists() for b in nodes.values())
    config = nl.config(net)
    assert (config.net.mac, config.net.mtu, config.features) == ("02:00:00:00:30:01", 9000, NET_FEATURES)
    present = device_names(nl)

    again = reconcile(nl, specs, in_use=())
    assert again == Report(unchanged=(net, blk))
    assert device_names(nl) == present
    assert {name: binding.binding_of(name) for name in (net, blk)} == nodes
    assert json.loads(json.dumps(again.as_dict())) == {
        "created": [], "unchanged": [net, blk], "differing": [], "in_use": [], "failed": []}


def test_a_device_made_otherwise_is_reported_differing_and_left_as_it_is(nl, names):
    other_mac, on_blk, unbound, fewer_features = names(), names(), names(), names()
    attach(nl, other_mac, "vdpasim_net", mac="02:00:00:00:30:02", mtu=1500)
    attach(nl, on_blk, "vdpasim_blk")
    attach(nl, unbound, "vdpasim_net")
    binding.unbind(unbound)
    bare = parse_features("VERSION_1,ACCESS_PLATFORM")
    attach(nl, fewer_features, "vdpasim_net", features=bare)
    before = {name: (nl.device(name), nl.config(name), binding.binding_of(name))
              for name in (other_mac, on_blk, unbound, fewer_features)}

    report = reconcile(nl, [
        DeviceSpec(other_mac, "vdpasim_net", mac="02:00:00:00:30:03", mtu=9000),
        DeviceSpec(on_blk, "vdpasim_net", mtu=1500),
        DeviceSpec(unbound, "vdpasim_net"),
        DeviceSpec(fewer_features, "vdpasim_net", mtu=1500, features=NET_FEATURES),
    ], in_use=())

    assert report == Report(differing=(
        Differing(other_mac, (Difference("mac", "02:00:00:00:30:03", "02:00:00:00:30:02"),
                              Difference("mtu", 9000, 1500))),
        Differing(on_blk, (Difference("mgmtdev", "vdpasim_net", "vdpasim_blk"),
                           Difference("class", "net", "block"))),
        Differing(unbound, (Difference("driver", "vhost_vdpa", None),)),
        # Without the MTU feature the kernel reports no MTU: the device cannot have the one wanted.
        Differing(fewer_features, (Difference("mtu", 1500, None), Difference("features", NET_FEATURES, bare))),
    ))
    after = {name: (nl.device(name), nl.config(name), binding.binding_of(name)) for name in before}
    assert after == before
    assert report.as_dict()["differing"][0] == {"device": other_mac, "differences": [
        {"attribute": "mac", "wanted": "02:00:00:00:30:03", "found": "02:00:00:00:30:02"},
        {"attribute": "mtu", "wanted": 9000, "found": 1500}]}


def test_a_spec_the_kernel_or_attach_refuses_fails_alone(nl, names):
    refused = [names() for _ in range(5)]
    good = names()
    with debug_logging(), capture_logs() as events:  # info events: below the default level
        report = reconcile(nl, [
            DeviceSpec(refused[0], "vdpasim_nosuch"),
            DeviceSpec(refused[1], "vdpasim_blk", mac="02:00:00:00:30:04"),
            DeviceSpec(refused[2], "vdpasim_blk", features=parse_features("VERSION_1")),
            DeviceSpec(refused[3], "vdpasim_net", max_vqp=2),
            DeviceSpec(refused[4], "vdpasim_net", mtu=9000, features=parse_features("VERSION_1,ACCESS_PLATFORM")),
            DeviceSpec(good, "vdpasim_net"),
        ], in_use=())
    assert report.created == (good,)
    assert [f.device for f in report.failed] == refused
    errors = [f.error for f in report.failed]
    assert "no management device 'vdpasim_nosuch'; there are: " in errors[0] and "vdpasim_net" in errors[0]
    assert "mac apply to net devices; vdpasim_blk makes block devices" in errors[1]  # refused before DEV_NEW
    # The kernel's own refusals, extack text and all: attributes a parent does not take (their
    # VDPA_ATTR_ bits: DEV_FEATURES 20, DEV_NET_CFG_MAX_VQP 12), a net attribute without its feature.
    assert "Some provided attributes are not supported: 0x100000 (ENOTSUP)" in errors[2]
    assert "Some provided attributes are not supported: 0x1000 (ENOTSUP)" in errors[3]
    assert "Missing features 0x8 for provided attributes (EINVAL)" in errors[4]
    assert set(refused).isdisjoint(device_names(nl))
    assert [e["action"] for e in events if e["event"] == "reconcile.device"] == ["failed"] * 5 + ["created"]
    assert json.loads(json.dumps(report.as_dict()))["failed"][0] == {"device": refused[0], "error": errors[0]}


def test_a_device_in_use_is_not_even_looked_at(nl, names):
    used = names()
    node = attach(nl, used, "vdpasim_net", mac="02:00:00:00:30:05").binding.node
    spec = DeviceSpec(used, "vdpasim_blk", mac="02:00:00:00:30:06", driver=Driver.VIRTIO_VDPA)
    with VhostVdpa(node), debug_logging(), capture_logs() as events:  # a session holds the node
        report = reconcile(nl, [spec], in_use={used})
    assert report == Report(in_use=(used,))
    assert [(e["event"], e.get("action")) for e in events] == [("reconcile.device", "in_use")]
    assert (nl.config(used).net.mac, binding.binding_of(used).node) == ("02:00:00:00:30:05", node)
