"""The migration state document on the host: JSON round trips, and every bad document or mismatched
destination refused by the field it is about (vdpad.service.migration)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from vdpad.client import AsyncSession, DaemonUnavailable, RemoteSession
from vdpad.service.protocol import remote_error
from vdpad.device.errors import InvalidArgument
from vdpad.service.migration import (
    PERMS, RUNNING, VERSION, DeviceDescription, DeviceState, DriverSettings, MapEntry, QueueSetup, QueueState, check,
)

U64 = st.integers(0, (1 << 64) - 1)
PAGE = 4096


def queues() -> st.SearchStrategy[tuple[QueueState, ...]]:
    one = st.one_of(st.just(None), st.tuples(st.sampled_from([1, 64, 256, 1 << 15, 1 << 16]), U64, U64, U64,
                                             st.integers(0, 0xFFFF)))
    return st.lists(one, max_size=5).map(lambda made: tuple(
        QueueState(i, False) if q is None else QueueState(i, True, *q) for i, q in enumerate(made)))


entries = st.builds(MapEntry, U64, U64, st.text(min_size=1, max_size=8), U64, st.sampled_from(PERMS))
states = st.builds(DeviceState, st.integers(0, 0xFFFF_FFFF), U64, st.integers(0, 0xFF), st.binary(max_size=64),
                   queues(), st.lists(st.integers(0, 3), max_size=3).map(tuple),
                   st.lists(st.lists(entries, max_size=4).map(tuple), max_size=3).map(tuple))


@given(states)
def test_a_state_round_trips_through_json_text(state):
    text = json.dumps(state.to_json())
    assert DeviceState.from_json(json.loads(text), "dst") == state


# -- a net device's state and a destination that matches it ---------------------------------------------
RAM = 1 << 20
IOVA = 0x7000_0000_0000


def net_state() -> DeviceState:
    return DeviceState(
        device_id=1, features=(1 << 32) | (1 << 33) | (1 << 5), status=int(RUNNING), config=bytes(24),
        queues=(QueueState(0, True, 64, IOVA, IOVA + 0x400, IOVA + 0x1000, 8),
                QueueState(1, True, 64, IOVA + 0x2000, IOVA + 0x2400, IOVA + 0x3000, 8), QueueState(2, False)),
        groups=(0, 1), spaces=((MapEntry(IOVA, RAM, "ram", 0, "rw"),), ()))


def net_device(**changed) -> DeviceDescription:
    made = DeviceDescription(name="dst", device_id=1, offered=(1 << 34) - 1, status=0, ring_limits=(256, 256, 256),
                             group_num=2, as_num=2, iova_first=0, iova_last=(1 << 64) - 1, memory={"ram": RAM})
    return dataclasses.replace(made, **changed)


def test_a_matching_destination_is_accepted():
    check(net_state(), net_device())


def refused(where: str, state: DeviceState | None = None, device: DeviceDescription | None = None) -> str:
    with pytest.raises(InvalidArgument) as raised:
        check(state or net_state(), device or net_device())
    assert raised.value.problem.startswith(f"state.{where}: "), raised.value.problem
    return raised.value.problem


def test_another_device_type_is_refused_by_device_id():
    assert "virtio device 1 (net); dst is 2 (block)" in refused("device_id", device=net_device(device_id=2))


@pytest.mark.parametrize("limits", [(256, 256), (256, 256, 256, 256)], ids=["extra", "missing"])
def test_a_queue_too_many_or_missing_is_refused_by_queues(limits):
    assert f"3 virtqueues; dst has {len(limits)}" in refused("queues", device=net_device(ring_limits=limits))


def test_a_ring_the_destination_cannot_take_is_refused_by_its_size():
    assert "up to 32" in refused("queues[1].size", device=net_device(ring_limits=(256, 32, 256)))


def test_features_not_offered_are_refused_by_features():
    assert "does not offer 0x300000000 of 0x300000020" in refused("features", device=net_device(offered=(1 << 32) - 1))


def test_an_address_space_the_destination_lacks_is_refused_by_spaces():
    problem = refused("spaces[1]", device=net_device(as_num=1, group_num=2))
    assert "1 address space(s)" in problem


def test_memory_not_registered_on_the_destination_is_refused_by_the_entry():
    assert "'ram' is not registered" in refused("spaces[0].map[0].memory", device=net_device(memory={"rom": RAM}))
    assert "not inside memory 'ram'" in refused("spaces[0].map[0].offset", device=net_device(memory={"ram": PAGE}))


def test_a_map_outside_the_iova_range_is_refused_by_its_iova():
    refused("spaces[0].map[0].iova", device=net_device(iova_last=IOVA))


def test_a_destination_not_reset_or_a_state_not_running_is_refused_by_status():
    assert "a load starts from a reset device" in refused("status", device=net_device(status=int(RUNNING)))
    refused("status", state=dataclasses.replace(net_state(), status=0x7))


def test_a_group_in_an_address_space_the_state_lacks_is_refused():
    refused("groups[1]", state=dataclasses.replace(net_state(), groups=(0, 2)))
    refused("groups", device=net_device(group_num=1))


# -- the document's own schema --------------------------------------------------------------------------
def doc_refused(change, where: str) -> str:
    doc = copy.deepcopy(net_state().to_json())
    change(doc)
    with pytest.raises(InvalidArgument) as raised:
        DeviceState.from_json(doc, "dst")
    assert raised.value.problem.startswith(f"{where}: "), raised.value.problem
    return raised.value.problem


def test_a_document_of_a_future_version_is_refused_by_version():
    assert "the document is newer" in doc_refused(lambda d: d.update(version=VERSION + 1), "state.version")
    doc_refused(lambda d: d.pop("version"), "state.version")


def test_missing_extra_and_mistyped_fields_are_named():
    assert "is missing" in doc_refused(lambda d: d["queues"][0].pop("base"), "state.queues[0].base")
    assert "'colour'" in doc_refused(lambda d: d["spaces"][0]["map"][0].update(colour=1), "state.spaces[0].map[0]")
    doc_refused(lambda d: d.update(features=-1), "state.features")
    doc_refused(lambda d: d["groups"].__setitem__(1, "one"), "state.groups[1]")
    doc_refused(lambda d: d["spaces"][0]["map"][0].update(perm="x"), "state.spaces[0].map[0].perm")
    doc_refused(lambda d: d["queues"][1].update(index=0), "state.queues[1].index")
    doc_refused(lambda d: d.update(config="zz"), "state.config")
    with pytest.raises(InvalidArgument, match="state: must be a JSON object"):
        DeviceState.from_json([], "dst")


# -- what a session records of a client's calls -----------------------------------------------------------
def test_the_settings_a_save_needs_are_noted_from_the_calls():
    noted = DriverSettings()
    noted.note("set_features", {"features": 0x3})
    noted.note("set_vring_num", {"index": 1, "num": 64})
    noted.note("set_vring_addr", {"index": 1, "desc": 1, "avail": 2, "used": 3})
    noted.note("set_vring_enable", {"index": 1, "enabled": True})
    noted.note("set_vring_base", {"index": 0, "base": 5})  # read back from the device instead
    assert noted == DriverSettings(0x3, {1: QueueSetup(64, (1, 2, 3), True)})


# -- the client's side of a failed load ----------------------------------------------------------------
class Side:
    """A session's side of migrate_to, as the daemon answers it: what was asked, in order."""

    def __init__(self, failure: BaseException | None = None):
        self.asked: list[str] = []
        self.failure = failure
        self._target = self  # AsyncSession's blocking session
        self.device = self
        self.client = object()  # a connection of its own: save and load are separate requests

    def save(self):
        self.asked.append("save")
        return {"version": 1}

    def load(self, state):
        self.asked.append("load")
        if self.failure is not None:
            raise self.failure

    def resume(self):
        self.asked.append("resume")


FAILED_LOAD = remote_error({"kind": "kernel", "errno": 22, "message": "failure injected"})


@pytest.mark.parametrize("failure, resumed", [(None, False), (FAILED_LOAD, True),
                                              (DaemonUnavailable(0, "reply lost"), False)],
                         ids=["loaded", "load-refused", "reply-lost"])
@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "trio"])
def test_the_source_is_resumed_only_when_the_daemon_says_the_load_failed(failure, resumed, blocking):
    source, destination = Side(), Side(failure)
    if blocking:
        run = lambda: RemoteSession.migrate_to(source, destination)  # noqa: E731
    else:
        async def main():
            lane = trio.CapacityLimiter(1)
            return await AsyncSession(source, lane).migrate_to(AsyncSession(destination, lane))
        run = lambda: trio.run(main)  # noqa: E731
    if failure is None:
        assert run() == {"version": 1}
    else:
        with pytest.raises(type(failure)):
            run()
    assert source.asked == (["save", "resume"] if resumed else ["save"])
    assert destination.asked == ["load"]


def test_two_sessions_of_one_connection_migrate_in_one_request():
    """The daemon does the save, the load and (when the load fails) the resume: the client asks once."""
    class Session:
        def __init__(self, client, number):
            self.client, self.number, self.asked = client, number, []

        def _plain(self, op, **args):
            self.asked.append((op, args))
            return {"state": {"version": 1}}

    client = object()
    source, destination = Session(client, 1), Session(client, 2)
    assert RemoteSession.migrate_to(source, destination) == {"version": 1}
    assert source.asked == [("session.migrate", {"to": 2})] and destination.asked == []
