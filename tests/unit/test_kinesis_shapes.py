"""Kinesis request and response shapes, decoded from literal JSON bodies (no network)."""

from __future__ import annotations

import base64
from typing import Any

import msgspec
import pytest

from kinesis_butler.aws import (
    ChildShard,
    HashKeyRange,
    KinesisClient,
    PutRecordsEntry,
    ShardFilter,
    StreamSummary,
)
from kinesis_butler.errors import AwsError, ConfigError
from kinesis_butler.models import Record, Shard

MAX_HASH = 2**128 - 1


class CannedTransport:
    """A Transport that answers each operation from a queue of literal bodies and records requests."""

    endpoint_url = "http://canned.invalid"
    region = "us-east-1"

    def __init__(self, *bodies: bytes) -> None:
        self.bodies = list(bodies)
        self.requests: list[tuple[str, dict[str, Any]]] = []

    async def call(self, operation: str, body: bytes, *, max_attempts: int | None = None) -> bytes:
        self.requests.append((operation, msgspec.json.decode(body)))
        return self.bodies.pop(0)

    async def aclose(self) -> None:
        pass


def client_with(*bodies: bytes) -> tuple[KinesisClient, CannedTransport]:
    transport = CannedTransport(*bodies)
    return KinesisClient(transport=transport), transport


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- GetRecords -----------------------------------------------------------------------------------

GET_RECORDS_BODY = b"""{
  "Records": [
    {
      "Data": "%(d1)s",
      "PartitionKey": "user-17",
      "SequenceNumber": "49590338271490256608559692538361571095921575989136588898",
      "ApproximateArrivalTimestamp": 1.795431832505E9,
      "EncryptionType": "KMS"
    },
    {
      "Data": "",
      "PartitionKey": "\xc3\xa9t\xc3\xa9",
      "SequenceNumber": "49590338271490256608559692538361571095921575989136588899",
      "ApproximateArrivalTimestamp": 1795431833
    },
    {
      "Data": "%(d3)s",
      "PartitionKey": "k",
      "SequenceNumber": "3",
      "ApproximateArrivalTimestamp": 1795431834.25,
      "EncryptionType": "NONE"
    }
  ],
  "NextShardIterator": "AAAAAAAAAAGnext",
  "MillisBehindLatest": 1234,
  "ChildShards": null
}""" % {b"d1": b64(b"hello world").encode(), b"d3": b64(bytes(range(256))).encode()}


async def test_get_records_decodes_every_record_field_into_models_record() -> None:
    client, _ = client_with(GET_RECORDS_BODY)
    result = await client.get_records("it")
    assert [type(r) for r in result.records] == [Record, Record, Record]
    first, second, third = result.records
    assert first.data == b"hello world"
    assert first.partition_key == "user-17"
    assert first.sequence_number == "49590338271490256608559692538361571095921575989136588898"
    assert first.approximate_arrival_timestamp == pytest.approx(1795431832.505)
    assert first.encryption_type == "KMS"
    assert second.data == b""
    assert second.partition_key == "été"
    assert second.approximate_arrival_timestamp == 1795431833.0
    assert second.encryption_type is None
    assert third.data == bytes(range(256))
    assert third.encryption_type == "NONE"
    # Fields that are not on the wire keep their defaults; the shard loop fills them in.
    assert (first.sub_sequence_number, first.shard_id, first.stream, first.explicit_hash_key) == (
        0,
        "",
        "",
        None,
    )
    assert result.next_shard_iterator == "AAAAAAAAAAGnext"
    assert result.millis_behind_latest == 1234
    assert result.child_shards == []
    assert not result.at_shard_end


async def test_get_records_at_shard_end_of_a_split_has_no_iterator_and_two_children() -> None:
    body = b"""{
      "Records": [],
      "NextShardIterator": null,
      "MillisBehindLatest": 0,
      "ChildShards": [
        {"ShardId": "shardId-000000000003", "ParentShards": ["shardId-000000000000"],
         "HashKeyRange": {"StartingHashKey": "0", "EndingHashKey": "56713727820156410577229101238628035241"}},
        {"ShardId": "shardId-000000000004", "ParentShards": ["shardId-000000000000"],
         "HashKeyRange": {"StartingHashKey": "56713727820156410577229101238628035242",
                          "EndingHashKey": "113427455640312821154458202477256070484"}}
      ]
    }"""
    client, _ = client_with(body)
    result = await client.get_records("it")
    assert result.records == []
    assert result.next_shard_iterator is None
    assert result.at_shard_end
    assert result.child_shards == [
        ChildShard(
            "shardId-000000000003",
            ["shardId-000000000000"],
            HashKeyRange("0", "56713727820156410577229101238628035241"),
        ),
        ChildShard(
            "shardId-000000000004",
            ["shardId-000000000000"],
            HashKeyRange("56713727820156410577229101238628035242", "113427455640312821154458202477256070484"),
        ),
    ]
    assert result.child_shards[1].to_shard() == Shard(
        shard_id="shardId-000000000004",
        parent_shard_id="shardId-000000000000",
        starting_hash_key=56713727820156410577229101238628035242,
        ending_hash_key=113427455640312821154458202477256070484,
    )


async def test_get_records_at_shard_end_of_a_merge_names_both_parents() -> None:
    body = (
        b'{"Records":[],"NextShardIterator":null,"ChildShards":[{"ShardId":"shardId-000000000005",'
        b'"ParentShards":["shardId-000000000001","shardId-000000000002"],'
        b'"HashKeyRange":{"StartingHashKey":"0","EndingHashKey":"340282366920938463463374607431768211455"}}]}'
    )
    client, _ = client_with(body)
    child = (await client.get_records("it")).child_shards[0].to_shard()
    assert child.parent_ids == ("shardId-000000000001", "shardId-000000000002")
    assert (child.starting_hash_key, child.ending_hash_key) == (0, MAX_HASH)


async def test_unknown_fields_are_ignored_at_every_level() -> None:
    body = (
        b'{"Records":[{"Data":"eA==","PartitionKey":"p","SequenceNumber":"1","ApproximateArrivalTimestamp":1,'
        b'"FutureField":{"nested":[1,2]},"SubSequenceNumber":"x"}],'
        b'"NextShardIterator":"n","MillisBehindLatest":0,"Brand":"new",'
        b'"ChildShards":[{"ShardId":"s","ParentShards":["p"],"Extra":true,'
        b'"HashKeyRange":{"StartingHashKey":"1","EndingHashKey":"2","Extra":0}}]}'
    )
    client, _ = client_with(body)
    result = await client.get_records("it")
    assert result.records[0].data == b"x"
    assert result.child_shards[0].hash_key_range == HashKeyRange("1", "2")


async def test_minimal_get_records_body_uses_defaults() -> None:
    client, _ = client_with(b"{}")
    result = await client.get_records("it")
    assert (result.records, result.next_shard_iterator, result.millis_behind_latest, result.child_shards) == (
        [],
        None,
        None,
        [],
    )


@pytest.mark.parametrize(
    "body",
    [
        b'{"Records":[{"Data":"not base64!","PartitionKey":"p","SequenceNumber":"1"}]}',
        b'{"Records":[{"Data":"eA==","SequenceNumber":"1"}]}',  # PartitionKey missing
        b'{"Records":[{"Data":"eA==","PartitionKey":"p","SequenceNumber":"1","ApproximateArrivalTimestamp":"x"}]}',
        b'{"Records": [',
        b"<html>",
    ],
)
async def test_malformed_get_records_bodies_are_aws_errors(body: bytes) -> None:
    client, _ = client_with(body)
    with pytest.raises(AwsError) as info:
        await client.get_records("it")
    assert info.value.code == "MalformedResponse"
    assert info.value.operation == "GetRecords"


async def test_get_records_request_shape() -> None:
    client, transport = client_with(b"{}", b"{}")
    await client.get_records("iter-1")
    await client.get_records("iter-2", limit=500)
    assert transport.requests == [
        ("GetRecords", {"ShardIterator": "iter-1"}),
        ("GetRecords", {"ShardIterator": "iter-2", "Limit": 500}),
    ]


# -- ListShards -----------------------------------------------------------------------------------


def shard_json(index: int, *, parent: str | None = None, ending: str | None = None) -> dict[str, Any]:
    shard: dict[str, Any] = {
        "ShardId": f"shardId-{index:012d}",
        "HashKeyRange": {"StartingHashKey": str(index * 10), "EndingHashKey": str(index * 10 + 9)},
        "SequenceNumberRange": {"StartingSequenceNumber": f"{index}00"},
        "Unknown": 1,
    }
    if parent:
        shard["ParentShardId"] = parent
    if ending:
        shard["SequenceNumberRange"]["EndingSequenceNumber"] = ending
    return shard


async def test_list_shards_follows_next_token_without_stream_name() -> None:
    page1 = msgspec.json.encode({"Shards": [shard_json(0, ending="999")], "NextToken": "tok-1"})
    page2 = msgspec.json.encode({"Shards": [shard_json(1), shard_json(2, parent="shardId-000000000000")]})
    client, transport = client_with(page1, page2)
    shards = await client.list_shards("orders", shard_filter=ShardFilter("AT_LATEST"), max_results=1)
    assert shards == [
        Shard("shardId-000000000000", None, None, 0, 9, "000", "999"),
        Shard("shardId-000000000001", None, None, 10, 19, "100", None),
        Shard("shardId-000000000002", "shardId-000000000000", None, 20, 29, "200", None),
    ]
    assert shards[0].is_closed
    assert transport.requests == [
        ("ListShards", {"StreamName": "orders", "MaxResults": 1, "ShardFilter": {"Type": "AT_LATEST"}}),
        ("ListShards", {"NextToken": "tok-1", "MaxResults": 1}),
    ]


async def test_list_shards_tolerates_null_shards_and_encodes_filters() -> None:
    client, transport = client_with(b'{"Shards":null}', b'{"Shards":[]}')
    assert (
        await client.list_shards("s", shard_filter=ShardFilter("AFTER_SHARD_ID", shard_id="shardId-1")) == []
    )
    assert (
        await client.list_shards("s", shard_filter=ShardFilter("FROM_TIMESTAMP", timestamp=1795431832.5))
        == []
    )
    assert transport.requests[0][1]["ShardFilter"] == {"Type": "AFTER_SHARD_ID", "ShardId": "shardId-1"}
    assert transport.requests[1][1]["ShardFilter"] == {"Type": "FROM_TIMESTAMP", "Timestamp": 1795431832.5}


# -- other operations -----------------------------------------------------------------------------


async def test_describe_stream_summary_flattens_the_wire_shape() -> None:
    body = b"""{"StreamDescriptionSummary": {
        "StreamName": "orders", "StreamARN": "arn:aws:kinesis:us-east-1:000000000000:stream/orders",
        "StreamStatus": "ACTIVE", "StreamModeDetails": {"StreamMode": "ON_DEMAND"},
        "RetentionPeriodHours": 48, "StreamCreationTimestamp": 1.7954318325E9,
        "EnhancedMonitoring": [{"ShardLevelMetrics": []}], "EncryptionType": "NONE",
        "OpenShardCount": 4, "ConsumerCount": 1}}"""
    client, transport = client_with(body)
    summary = await client.describe_stream_summary("orders")
    assert summary == StreamSummary(
        stream_name="orders",
        stream_arn="arn:aws:kinesis:us-east-1:000000000000:stream/orders",
        stream_status="ACTIVE",
        open_shard_count=4,
        retention_period_hours=48,
        stream_creation_timestamp=1795431832.5,
        stream_mode="ON_DEMAND",
        consumer_count=1,
        encryption_type="NONE",
    )
    assert transport.requests == [("DescribeStreamSummary", {"StreamName": "orders"})]


async def test_put_records_encodes_base64_and_decodes_partial_failures() -> None:
    body = b"""{"FailedRecordCount": 1, "EncryptionType": "NONE", "Records": [
        {"SequenceNumber": "111", "ShardId": "shardId-000000000000"},
        {"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "Rate exceeded"}]}"""
    client, transport = client_with(body)
    result = await client.put_records(
        "s",
        [PutRecordsEntry(b"\x00\xff", "a"), PutRecordsEntry(b"text", "b", explicit_hash_key=str(MAX_HASH))],
    )
    assert result.failed_record_count == 1
    assert result.records[0].sequence_number == "111"
    assert result.records[0].error_code is None
    assert result.records[1].error_code == "ProvisionedThroughputExceededException"
    assert result.records[1].shard_id is None
    assert transport.requests[0][1] == {
        "StreamName": "s",
        "Records": [
            {"Data": "AP8=", "PartitionKey": "a"},
            {"Data": "dGV4dA==", "PartitionKey": "b", "ExplicitHashKey": str(MAX_HASH)},
        ],
    }


async def test_put_record_round_trips() -> None:
    client, transport = client_with(b'{"ShardId":"shardId-000000000001","SequenceNumber":"42"}')
    result = await client.put_record("s", b"hi", "pk")
    assert (result.shard_id, result.sequence_number) == ("shardId-000000000001", "42")
    assert transport.requests[0][1] == {"StreamName": "s", "Data": "aGk=", "PartitionKey": "pk"}


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"iterator_type": "TRIM_HORIZON"}, {}),
        ({"iterator_type": "LATEST"}, {}),
        (
            {"iterator_type": "AT_SEQUENCE_NUMBER", "sequence_number": "123"},
            {"StartingSequenceNumber": "123"},
        ),
        ({"iterator_type": "AFTER_SEQUENCE_NUMBER", "sequence_number": "9"}, {"StartingSequenceNumber": "9"}),
        ({"iterator_type": "AT_TIMESTAMP", "timestamp": 1795431832.25}, {"Timestamp": 1795431832.25}),
    ],
)
async def test_get_shard_iterator_request_shapes(kwargs: dict[str, Any], expected: dict[str, Any]) -> None:
    client, transport = client_with(b'{"ShardIterator":"it-9"}')
    assert await client.get_shard_iterator("s", "shardId-000000000000", **kwargs) == "it-9"
    assert transport.requests[0][1] == {
        "StreamName": "s",
        "ShardId": "shardId-000000000000",
        "ShardIteratorType": kwargs["iterator_type"],
        **expected,
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"iterator_type": "SOMEWHERE"},
        {"iterator_type": "AT_SEQUENCE_NUMBER"},
        {"iterator_type": "TRIM_HORIZON", "sequence_number": "1"},
        {"iterator_type": "AT_TIMESTAMP"},
        {"iterator_type": "LATEST", "timestamp": 1.0},
    ],
)
async def test_get_shard_iterator_rejects_inconsistent_arguments(kwargs: dict[str, Any]) -> None:
    client, transport = client_with()
    with pytest.raises(ConfigError):
        await client.get_shard_iterator("s", "shardId-0", **kwargs)
    assert transport.requests == []


async def test_admin_request_shapes() -> None:
    client, transport = client_with(*([b"{}"] * 6))
    await client.create_stream("s", 3)
    await client.delete_stream("s")
    await client.delete_stream("s", enforce_consumer_deletion=True)
    await client.split_shard("s", "shardId-0", 2**127)
    await client.merge_shards("s", "shardId-1", "shardId-2")
    await client.update_shard_count("s", 8)
    assert transport.requests == [
        ("CreateStream", {"StreamName": "s", "ShardCount": 3}),
        ("DeleteStream", {"StreamName": "s"}),
        ("DeleteStream", {"StreamName": "s", "EnforceConsumerDeletion": True}),
        ("SplitShard", {"StreamName": "s", "ShardToSplit": "shardId-0", "NewStartingHashKey": str(2**127)}),
        (
            "MergeShards",
            {"StreamName": "s", "ShardToMerge": "shardId-1", "AdjacentShardToMerge": "shardId-2"},
        ),
        ("UpdateShardCount", {"StreamName": "s", "TargetShardCount": 8, "ScalingType": "UNIFORM_SCALING"}),
    ]


def test_aws_package_exports() -> None:
    from kinesis_butler import aws

    assert sorted(aws.__all__) == sorted(
        [
            "ERROR_CODES",
            "AwsCredentials",
            "ChildShard",
            "CredentialsProvider",
            "GetRecordsResult",
            "HashKeyRange",
            "JsonTransport",
            "KinesisClient",
            "PutRecordResult",
            "PutRecordsEntry",
            "PutRecordsResult",
            "PutRecordsResultEntry",
            "ShardFilter",
            "ShardSubscription",
            "SigV4Signer",
            "StreamConsumer",
            "StreamSummary",
            "StreamingOptions",
            "SubscribeToShardEvent",
            "Transport",
            "TransportOptions",
        ]
    )
    assert all(hasattr(aws, name) for name in aws.__all__)
