"""Positions, start positions and the Record shape."""

from __future__ import annotations

import pytest

from kinesis_butler.errors import ConfigError
from kinesis_butler.models import (
    AT_TIMESTAMP,
    LATEST,
    SHARD_END,
    TRIM_HORIZON,
    ExtendedSequenceNumber,
    InitialPosition,
    StartPosition,
)


def test_sequence_numbers_order_numerically_not_lexically() -> None:
    assert ExtendedSequenceNumber("9") < ExtendedSequenceNumber("10")
    assert ExtendedSequenceNumber("10", 1) > ExtendedSequenceNumber("10", 0)
    assert ExtendedSequenceNumber(
        "49680488837574954434346586243019609774202710085288853506"
    ) < ExtendedSequenceNumber("49680488837597255179545116866308634442468343206108987410")


def test_sentinels_sort_around_real_positions() -> None:
    real = ExtendedSequenceNumber("123")
    assert TRIM_HORIZON < AT_TIMESTAMP < LATEST < real < SHARD_END
    assert SHARD_END.is_shard_end and SHARD_END.is_sentinel and not real.is_sentinel


@pytest.mark.parametrize("bad", ["", "12a", "-1", "shard_end"])
def test_invalid_sequence_numbers_are_rejected(bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid sequence number"):
        ExtendedSequenceNumber(bad)


def test_negative_sub_sequence_is_rejected() -> None:
    with pytest.raises(ConfigError, match="sub-sequence"):
        ExtendedSequenceNumber("1", -1)


def test_start_position_parsing() -> None:
    assert StartPosition.parse("TRIM_HORIZON").kind is InitialPosition.TRIM_HORIZON
    assert StartPosition.parse("latest").kind is InitialPosition.LATEST
    at = StartPosition.parse("at_timestamp:2026-11-23T10:00:00Z")
    assert at.kind is InitialPosition.AT_TIMESTAMP
    assert at.timestamp == 1795428000.0
    naive = StartPosition.parse("at_timestamp:2026-11-23T10:00:00")
    assert naive.timestamp == at.timestamp  # naive times are UTC


@pytest.mark.parametrize(
    ("text", "message"),
    [("oldest", "use trim_horizon, latest"), ("at_timestamp:yesterday", "not an ISO 8601 time")],
)
def test_invalid_start_positions_name_the_fix(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        StartPosition.parse(text)
