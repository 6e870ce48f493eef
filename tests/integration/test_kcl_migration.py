"""A lease table exactly as a Java KCL application leaves it: a kinesis-butler worker takes the
leases over and resumes right after the KCL's checkpoints, keeping the KCL's own attributes."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from pathlib import Path

import boto3
import pytest

from kinesis_butler import AsyncConsumer, ConsumerConfig
from kinesis_butler.aws import KinesisClient
from tests.helpers import Collector, wait_until
from tests.integration.conftest import StreamFactory, put_numbers

pytestmark = pytest.mark.integration

KEY_ID, SECRET = "kinesisButlerTest", "kinesisButlerTest"


def _kcl_table(endpoint: str, table: str, items: list[dict[str, dict[str, object]]]) -> object:
    """Create the table and items with boto3, the way the KCL's DynamoDBLeaseRefresher does."""
    dynamodb = boto3.client(
        "dynamodb", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )  # fmt: skip
    dynamodb.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "leaseKey", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "leaseKey", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    dynamodb.get_waiter("table_exists").wait(TableName=table)
    for item in items:
        dynamodb.put_item(TableName=table, Item=item)
    return dynamodb


async def test_a_worker_resumes_from_the_checkpoints_a_kcl_application_left(
    kinesis: KinesisClient,
    new_stream: StreamFactory,
    dynamodb_moto: str,
    dynamodb_table: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    stream = await new_stream(2)
    await put_numbers(kinesis, stream, 0, 200)
    shards = await kinesis.list_shards(stream)
    by_shard: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for shard in shards:
        iterator = await kinesis.get_shard_iterator(stream, shard.shard_id, "TRIM_HORIZON")
        batch = await kinesis.get_records(iterator)
        by_shard[shard.shard_id] = [(r.sequence_number, json.loads(r.data)["n"]) for r in batch.records]
    # The KCL processed the first 30 records of each shard, then its worker went away.
    checkpoints = {shard: records[29][0] for shard, records in by_shard.items()}
    expected = {n for records in by_shard.values() for _, n in records[30:]}
    items = [
        {
            "leaseKey": {"S": shard.shard_id},
            "leaseOwner": {"S": "kcl-worker-7f3a"},
            "leaseCounter": {"N": "4711"},
            "checkpoint": {"S": checkpoints[shard.shard_id]},
            "checkpointSubSequenceNumber": {"N": "0"},
            "ownerSwitchesSinceCheckpoint": {"N": "0"},
            "startingHashKey": {"S": str(shard.starting_hash_key)},
            "endingHashKey": {"S": str(shard.ending_hash_key)},
            "throughputKBps": {"N": "12.5"},  # KCL 3 writes these; we must keep them
            "leaseState": {"S": "ACTIVE"},
        }
        for shard in shards
    ]
    dynamodb = await asyncio.to_thread(_kcl_table, dynamodb_moto, dynamodb_table, items)

    seen = Collector()
    consumer = AsyncConsumer(
        stream,
        "kcl-app",
        seen,
        store=f"dynamodb://{dynamodb_table}?region=us-east-1&endpoint_url={dynamodb_moto}",
        client=kinesis,
        config=ConsumerConfig(
            failover_time=2.0,
            take_interval=0.5,
            idle_poll_interval=0.1,
            min_poll_interval=0.05,
            shard_read_calls_per_second=1000.0,
        ),
    )
    runner = asyncio.create_task(consumer.run())
    try:
        # The KCL worker's leases look alive until their counter stays still for the failover time.
        await wait_until(
            lambda: len(seen.records) >= len(expected), timeout=60, what="the records after the KCL's"
        )
    finally:
        consumer.request_stop()
        await runner
    assert set(seen.numbers) == expected
    assert len(seen.numbers) == len(expected)  # nothing before the KCL's checkpoint, nothing twice

    table = await asyncio.to_thread(dynamodb.scan, TableName=dynamodb_table, ConsistentRead=True)  # type: ignore[attr-defined]
    for item in table["Items"]:
        shard = item["leaseKey"]["S"]
        assert item["checkpoint"]["S"] == by_shard[shard][-1][0]  # written back in the KCL's format
        assert item["checkpointSubSequenceNumber"]["N"] == "0"
        assert int(item["leaseCounter"]["N"]) > 4711
        assert item["throughputKBps"]["N"] == "12.5"
        assert item["leaseState"]["S"] == "ACTIVE"
        assert "leaseOwner" not in item  # released on shutdown
