"""The pure parts of vIOMMU domains: staging a commit, answering a miss from a map, the rate-limited log."""

from __future__ import annotations

import pytest
import structlog

from vdpad.device import InvalidArgument
from vdpad.iotlb import PAGE_SIZE, MemoryRegion, Perm
from vdpad.iotlb.space import Mapping
from vdpad.service import misses
from vdpad.service.domains import Domain
from vdpad.service.misses import RateLimitedLog, answer_for, service_percentiles
from vdpad.service.sessions import MapOp, Peer

P = PAGE_SIZE


@pytest.fixture
def domain():
    made = Domain("d", Peer(1, 0, 0))
    made.regions["ram"] = MemoryRegion(16 * P, "ram")
    yield made
    for region in made.regions.values():
        region.close()


def test_a_staged_commit_gives_the_map_and_the_ranges_it_takes_away_and_changes_nothing(domain):
    target, revoked = domain.stage([MapOp("map", 0, 8 * P, "ram", 0, Perm.RW),
                                    MapOp("unmap", 2 * P, P), MapOp("map", 2 * P, P, "ram", 2 * P, Perm.RO)])
    assert [(m.iova, m.size, m.perm) for m in target] == [(0, 2 * P, Perm.RW), (2 * P, P, Perm.RO),
                                                          (3 * P, 5 * P, Perm.RW)]
    assert revoked == [(2 * P, P)]
    assert len(domain.map) == 0  # staged only


@pytest.mark.parametrize("ops, problem", [
    ([MapOp("map", 0, P, "nothing")], "domain d has no memory 'nothing' \\(registered: ram\\)"),
    ([MapOp("map", 0, P, "ram"), MapOp("map", 0, P, "ram", P)], r"ops\[1\] \(map .*\): .* overlaps"),
    ([MapOp("unmap", 0, P)], r"ops\[0\] \(unmap .*\): nothing is mapped there"),
    ([MapOp("map", 1, P, "ram")], "page-aligned"),
    ([MapOp("map", 0, 0, "ram")], "the size positive"),
    ([MapOp("map", (1 << 64) - P, 2 * P, "ram")], "inside 64 bits"),
    ([MapOp("map", 0, P, "ram", 16 * P)], "not a page-aligned window of 'ram'"),
    ([MapOp("map", 0, P, "ram", 0, Perm(0))], "perm must be ro, wo or rw"),
])
def test_a_bad_op_is_refused_by_name(domain, ops, problem):
    with pytest.raises(InvalidArgument, match=problem):
        domain.stage(ops)


def test_memory_the_map_points_into_is_not_released(domain):
    domain.map, _ = domain.stage([MapOp("map", 4 * P, P, "ram")])
    with pytest.raises(InvalidArgument, match=r"'ram' is mapped at .*unmap it first"):
        domain.release("ram")
    domain.map = domain.map.unmapped(4 * P, P)
    domain.release("ram")
    assert not domain.regions


def test_a_miss_is_answered_by_a_mapping_that_allows_the_access():
    with MemoryRegion(P, "r") as region:
        ro = Mapping(0, P, region, 0, Perm.RO)
        assert answer_for(ro, int(Perm.RO)) is None
        assert answer_for(ro, int(Perm.WO)) == "denied"
        assert answer_for(ro, int(Perm.RW)) == "denied"
        assert answer_for(Mapping(0, P, region, 0, Perm.RW), int(Perm.WO)) is None
        assert answer_for(None, int(Perm.RO)) == "unmapped"


def test_the_log_lets_a_burst_through_then_tells_how_many_it_kept_back(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(misses.time, "monotonic", lambda: now[0])
    with structlog.testing.capture_logs() as events:
        limited = RateLimitedLog(structlog.get_logger("test"))
        for _ in range(misses.LOG_BURST + 5):
            limited.warning("iotlb.miss_unanswered", iova=1)
        now[0] += misses.LOG_INTERVAL
        limited.warning("iotlb.miss_unanswered", iova=2)
    assert len(events) == misses.LOG_BURST + 1
    assert events[-1]["suppressed"] == 5 and "suppressed" not in events[0]


def test_service_percentiles_are_in_microseconds():
    assert service_percentiles([]) is None
    figures = service_percentiles([1000 * n for n in range(1, 101)])
    assert figures == {"p50": 51.0, "p99": 100.0, "max": 100.0, "count": 100}
