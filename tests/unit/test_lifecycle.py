"""The shard state machine: every legal move is allowed, every other one refused."""

from __future__ import annotations

import itertools

import pytest

from kinesis_butler.lifecycle import TRANSITIONS, IllegalTransition, ShardConsumer, ShardState

LEGAL = {
    (ShardState.WAITING_ON_PARENT_SHARDS, ShardState.INITIALIZING),
    (ShardState.INITIALIZING, ShardState.PROCESSING),
    (ShardState.PROCESSING, ShardState.SHARD_ENDED),
    (ShardState.SHARD_ENDED, ShardState.SHUTDOWN_COMPLETE),
    (ShardState.SHUTDOWN_REQUESTED, ShardState.SHUTDOWN_COMPLETE),
    (ShardState.LEASE_LOST, ShardState.SHUTDOWN_COMPLETE),
    (ShardState.SHARD_ENDED, ShardState.LEASE_LOST),
    (ShardState.SHARD_ENDED, ShardState.FAILED),
    (ShardState.SHUTDOWN_REQUESTED, ShardState.LEASE_LOST),
    *(
        (source, ending)
        for source in (ShardState.WAITING_ON_PARENT_SHARDS, ShardState.INITIALIZING, ShardState.PROCESSING)
        for ending in (ShardState.SHUTDOWN_REQUESTED, ShardState.LEASE_LOST, ShardState.FAILED)
    ),
}


def test_the_table_is_exactly_the_documented_machine() -> None:
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert table == LEGAL
    assert set(TRANSITIONS) == set(ShardState)


@pytest.mark.parametrize(("source", "target"), list(itertools.product(ShardState, ShardState)))
def test_move_allows_legal_and_refuses_illegal_transitions(source: ShardState, target: ShardState) -> None:
    consumer = ShardConsumer.__new__(ShardConsumer)  # only the state machine is exercised
    consumer.shard_id = "shard"
    consumer.state = source
    if (source, target) in LEGAL:
        consumer._move(target)
        assert consumer.state is target
    else:
        with pytest.raises(IllegalTransition, match=f"{source.name} -> {target.name}"):
            consumer._move(target)
