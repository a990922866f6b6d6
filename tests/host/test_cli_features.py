"""`--features`: the masks the command line reads from numbers and names."""

from __future__ import annotations

import re

import pytest

from vdpad.device.flags import NetFeature, VirtioFeature, describe, parse_features


@pytest.mark.parametrize("text, mask", [
    ("0x300000020", 0x300000020),
    ("0b101", 5),
    ("12", 12),
    ("VERSION_1,ACCESS_PLATFORM", (1 << 32) | (1 << 33)),
    ("version_1, mac ,net.MQ", (1 << 32) | (1 << 5) | (1 << 22)),
    ("blk.MQ,FLUSH", (1 << 12) | (1 << 9)),
    ("bit40", 1 << 40),
])
def test_parse_features(text, mask):
    assert parse_features(text) == mask


@pytest.mark.parametrize("text, problem", [
    ("MQ", "net.MQ or blk.MQ"),
    ("NO_SUCH", "unknown feature 'NO_SUCH'"),
    ("scsi.FLUSH", "prefix 'scsi' is not net or blk"),
    ("net.FLUSH", "unknown feature 'net.FLUSH'"),
    (",", "no feature"),
    (hex(1 << 64), "does not fit in 64 bits"),
])
def test_parse_features_refuses(text, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_features(text)


def test_parse_features_reads_what_describe_prints():
    offered = 0x308830028  # vdpasim_net's offer
    names = describe(offered, VirtioFeature, NetFeature)
    assert parse_features(",".join(names)) == offered
