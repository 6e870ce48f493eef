"""DynamoDbLeaseStore against moto and DynamoDB Local: KCL compatibility, schema checks, outages.

The KCL items here are written with boto3 exactly as a Java KCL 2.x / 3.x application leaves its
lease table (attribute names and types from DynamoDBLeaseSerializer and
DynamoDBMultiStreamLeaseSerializer), including attributes kinesis-butler does not model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from kinesis_butler.errors import StaleLease, StoreError, StoreSchemaError, StoreUnavailable
from kinesis_butler.models import SHARD_END, ExtendedSequenceNumber, Lease
from kinesis_butler.stores.dynamodb import DynamoDbLeaseStore
from kinesis_butler.testing.emulator import free_port
from tests.fixtures_dynamodb import CREDENTIALS, REGION, dynamodb_store

pytestmark = pytest.mark.integration

SEQ = "49590338271490256608559692538361571095921575989136588898"
NEXT_SEQ = "49590338271490256608559692540925702759324208523137515618"
MAX_HASH = str(2**128 - 1)
MID_HASH = str(2**127)
WORKER_A = "ip-10-0-1-17.ec2.internal:6b0c5a2e-1f4e-4a43-9a5d-0d7c1a9e2f10"  # KCL's host:uuid ids
WORKER_B = "ip-10-0-2-33.ec2.internal:0f3b0a4c-6d38-4a4b-8c0f-3e1f5c2d9b77"

# A split shard at its end, and its two children, one mid-stream with KCL 3's extras.
KCL_PARENT = {
    "leaseKey": {"S": "shardId-000000000000"},
    "leaseOwner": {"S": WORKER_A},
    "leaseCounter": {"N": "5821"},
    "checkpoint": {"S": "SHARD_END"},
    "checkpointSubSequenceNumber": {"N": "0"},
    "ownerSwitchesSinceCheckpoint": {"N": "0"},
    "childShardIds": {"SS": ["shardId-000000000001", "shardId-000000000002"]},
    "startingHashKey": {"S": "0"},
    "endingHashKey": {"S": MAX_HASH},
}
KCL_CHILD = {
    "leaseKey": {"S": "shardId-000000000001"},
    "leaseOwner": {"S": WORKER_A},
    "leaseCounter": {"N": "312"},
    "checkpoint": {"S": SEQ},
    "checkpointSubSequenceNumber": {"N": "0"},
    "ownerSwitchesSinceCheckpoint": {"N": "2"},
    "parentShardId": {"SS": ["shardId-000000000000"]},
    "startingHashKey": {"S": "0"},
    "endingHashKey": {"S": str(2**127 - 1)},
    "throughputKBps": {"N": "118.42857142857143"},  # KCL 3
    "pendingCheckpointState": {"B": b"app-state"},  # prepareCheckpoint(state) without a pending position
}
KCL_UNOWNED_CHILD = {
    "leaseKey": {"S": "shardId-000000000002"},
    "leaseCounter": {"N": "0"},
    "checkpoint": {"S": "TRIM_HORIZON"},
    "checkpointSubSequenceNumber": {"N": "0"},
    "ownerSwitchesSinceCheckpoint": {"N": "0"},
    "parentShardId": {"SS": ["shardId-000000000000"]},
    "startingHashKey": {"S": MID_HASH},
    "endingHashKey": {"S": MAX_HASH},
}
STREAM_ID = "123456789012:orders:1700000000"
KCL_MULTI_STREAM = {
    "leaseKey": {"S": f"{STREAM_ID}:shardId-000000000003"},
    "leaseOwner": {"S": WORKER_B},
    "leaseCounter": {"N": "77"},
    "checkpoint": {"S": SEQ},
    "checkpointSubSequenceNumber": {"N": "4"},
    "pendingCheckpoint": {"S": NEXT_SEQ},
    "pendingCheckpointSubSequenceNumber": {"N": "0"},
    "ownerSwitchesSinceCheckpoint": {"N": "1"},
    "streamName": {"S": STREAM_ID},
    "shardId": {"S": "shardId-000000000003"},
    "startingHashKey": {"S": "0"},
    "endingHashKey": {"S": MAX_HASH},
}
# Newer KCLs may keep other entities in the lease table, marked with entityType.
KCL_WORKER_METRICS = {
    "leaseKey": {"S": WORKER_A},
    "entityType": {"S": "WORKER_METRIC_STATS"},
    "lastUpdateTime": {"N": "1763894400"},
}


EXPECTED = {
    "shardId-000000000000": Lease(
        "shardId-000000000000",
        lease_owner=WORKER_A,
        lease_counter=5821,
        checkpoint=SHARD_END,
        child_shard_ids=frozenset({"shardId-000000000001", "shardId-000000000002"}),
        starting_hash_key="0",
        ending_hash_key=MAX_HASH,
    ),
    "shardId-000000000001": Lease(
        "shardId-000000000001",
        lease_owner=WORKER_A,
        lease_counter=312,
        checkpoint=ExtendedSequenceNumber(SEQ),
        owner_switches_since_checkpoint=2,
        parent_shard_ids=frozenset({"shardId-000000000000"}),
        starting_hash_key="0",
        ending_hash_key=str(2**127 - 1),
    ),
    "shardId-000000000002": Lease(
        "shardId-000000000002",
        parent_shard_ids=frozenset({"shardId-000000000000"}),
        starting_hash_key=MID_HASH,
        ending_hash_key=MAX_HASH,
    ),
    f"{STREAM_ID}:shardId-000000000003": Lease(
        f"{STREAM_ID}:shardId-000000000003",
        lease_owner=WORKER_B,
        lease_counter=77,
        checkpoint=ExtendedSequenceNumber(SEQ, 4),
        pending_checkpoint=ExtendedSequenceNumber(NEXT_SEQ),
        owner_switches_since_checkpoint=1,
        stream_name=STREAM_ID,
        shard_id="shardId-000000000003",
        starting_hash_key="0",
        ending_hash_key=MAX_HASH,
    ),
}


@pytest.fixture
def boto(dynamodb_endpoint: str) -> Iterator[Any]:
    client = boto3.client(
        "dynamodb",
        endpoint_url=dynamodb_endpoint,
        region_name=REGION,
        aws_access_key_id=CREDENTIALS.access_key_id,
        aws_secret_access_key=CREDENTIALS.secret_access_key,
    )
    yield client
    client.close()


def create_kcl_table(boto: Any, table: str) -> None:
    """The table as KCL 3 creates it: on demand, leaseKey, and its leaseOwner index."""
    boto.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "leaseKey", "KeyType": "HASH"}],
        AttributeDefinitions=[
            {"AttributeName": "leaseKey", "AttributeType": "S"},
            {"AttributeName": "leaseOwner", "AttributeType": "S"},
        ],
        BillingMode="PAY_PER_REQUEST",
        GlobalSecondaryIndexes=[
            {
                "IndexName": "LeaseOwnerToLeaseKeyIndex",
                "KeySchema": [
                    {"AttributeName": "leaseOwner", "KeyType": "HASH"},
                    {"AttributeName": "leaseKey", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "KEYS_ONLY"},
            }
        ],
    )


@pytest.fixture
def kcl_table(boto: Any, dynamodb_table: str) -> str:
    """A lease table as a KCL application left it."""
    create_kcl_table(boto, dynamodb_table)
    for item in (KCL_PARENT, KCL_CHILD, KCL_UNOWNED_CHILD, KCL_MULTI_STREAM, KCL_WORKER_METRICS):
        boto.put_item(TableName=dynamodb_table, Item=item)
    return dynamodb_table


@pytest.fixture
async def store(dynamodb_endpoint: str, dynamodb_table: str) -> Any:
    store = dynamodb_store(dynamodb_endpoint, dynamodb_table, "orders-app")
    yield store
    await store.aclose()


def raw(boto: Any, table: str, key: str) -> dict[str, Any] | None:
    item: dict[str, Any] | None = boto.get_item(
        TableName=table, Key={"leaseKey": {"S": key}}, ConsistentRead=True
    ).get("Item")
    if item:
        for value in item.values():  # DynamoDB returns set members in any order
            if "SS" in value:
                value["SS"] = sorted(value["SS"])
    return item


async def test_reads_the_leases_a_kcl_application_left(kcl_table: str, store: DynamoDbLeaseStore) -> None:
    await store.initialize()  # accepts KCL 3's table with its leaseOwner index
    assert await store.list_leases() == [EXPECTED[key] for key in sorted(EXPECTED)]
    for key, lease in EXPECTED.items():
        assert await store.get_lease(key) == lease
    assert EXPECTED[f"{STREAM_ID}:shardId-000000000003"].shard == "shardId-000000000003"


async def test_takes_and_checkpoints_kcl_leases_and_keeps_their_extras(
    kcl_table: str, store: DynamoDbLeaseStore, boto: Any
) -> None:
    held = EXPECTED["shardId-000000000001"]
    taken = await store.take_lease(held, "butler-1")
    assert taken == held.replace(lease_owner="butler-1", lease_counter=313, owner_switches_since_checkpoint=3)
    renewed = await store.renew_lease(taken)
    done = await store.checkpoint(renewed, ExtendedSequenceNumber(NEXT_SEQ, 2))
    assert (done.lease_counter, done.owner_switches_since_checkpoint) == (315, 0)
    expected = dict(KCL_CHILD)
    del expected["pendingCheckpointState"]  # the KCL's checkpoint removes it too
    assert raw(boto, kcl_table, "shardId-000000000001") == expected | {
        "leaseOwner": {"S": "butler-1"},
        "leaseCounter": {"N": "315"},
        "checkpoint": {"S": NEXT_SEQ},
        "checkpointSubSequenceNumber": {"N": "2"},
        "ownerSwitchesSinceCheckpoint": {"N": "0"},
    }
    assert (raw(boto, kcl_table, "shardId-000000000001") or {})["throughputKBps"] == {
        "N": "118.42857142857143"
    }


async def test_takes_an_unassigned_kcl_lease_and_lineage_updates_keep_kcl_types(
    kcl_table: str, store: DynamoDbLeaseStore, boto: Any
) -> None:
    taken = await store.take_lease(EXPECTED["shardId-000000000002"], "butler-1")
    assert (taken.lease_owner, taken.owner_switches_since_checkpoint, taken.lease_counter) == (
        "butler-1",
        0,
        1,
    )
    await store.update_lineage(taken, child_shard_ids=frozenset({"shardId-000000000009"}))
    assert raw(boto, kcl_table, "shardId-000000000002") == KCL_UNOWNED_CHILD | {
        "leaseOwner": {"S": "butler-1"},
        "leaseCounter": {"N": "2"},
        "childShardIds": {"SS": ["shardId-000000000009"]},
    }


async def test_multi_stream_leases_keep_stream_name_and_shard_id(
    kcl_table: str, store: DynamoDbLeaseStore, boto: Any
) -> None:
    key = f"{STREAM_ID}:shardId-000000000003"
    lease = EXPECTED[key]
    done = await store.checkpoint(await store.take_lease(lease, "butler-2"), SHARD_END)
    assert (done.stream_name, done.shard_id, done.pending_checkpoint) == (
        STREAM_ID,
        "shardId-000000000003",
        None,
    )
    item = raw(boto, kcl_table, key)
    assert item is not None
    assert (item["streamName"], item["shardId"]) == ({"S": STREAM_ID}, {"S": "shardId-000000000003"})
    assert "pendingCheckpoint" not in item
    assert "pendingCheckpointSubSequenceNumber" not in item


async def test_other_kcl_entities_in_the_table_are_ignored_and_untouched(
    kcl_table: str, store: DynamoDbLeaseStore, boto: Any
) -> None:
    assert await store.get_lease(WORKER_A) is None
    assert WORKER_A not in [lease.lease_key for lease in await store.list_leases()]
    assert await store.create_lease_if_absent(Lease(WORKER_A)) is False
    with pytest.raises(StaleLease, match="not a lease"):
        await store.renew_lease(Lease(WORKER_A))
    assert raw(boto, kcl_table, WORKER_A) == KCL_WORKER_METRICS


async def test_written_items_have_exactly_the_kcl_layout(store: DynamoDbLeaseStore, boto: Any) -> None:
    full = Lease(
        f"{STREAM_ID}:shardId-000000000005",
        lease_owner=WORKER_B,
        lease_counter=9,
        checkpoint=ExtendedSequenceNumber(SEQ, 3),
        pending_checkpoint=ExtendedSequenceNumber(NEXT_SEQ, 1),
        owner_switches_since_checkpoint=2,
        parent_shard_ids=frozenset({"shardId-000000000001", "shardId-000000000002"}),
        child_shard_ids=frozenset({"shardId-000000000007"}),
        starting_hash_key="0",
        ending_hash_key=MAX_HASH,
        checkpoint_owner=WORKER_A,
        stream_name=STREAM_ID,
        shard_id="shardId-000000000005",
    )
    assert await store.create_lease_if_absent(full)
    assert await store.create_lease_if_absent(Lease("shardId-000000000006"))
    assert raw(boto, store.table, full.lease_key) == {
        "leaseKey": {"S": full.lease_key},
        "leaseOwner": {"S": WORKER_B},
        "leaseCounter": {"N": "9"},
        "checkpoint": {"S": SEQ},
        "checkpointSubSequenceNumber": {"N": "3"},
        "pendingCheckpoint": {"S": NEXT_SEQ},
        "pendingCheckpointSubSequenceNumber": {"N": "1"},
        "ownerSwitchesSinceCheckpoint": {"N": "2"},
        "parentShardId": {"SS": ["shardId-000000000001", "shardId-000000000002"]},
        "childShardIds": {"SS": ["shardId-000000000007"]},
        "startingHashKey": {"S": "0"},
        "endingHashKey": {"S": MAX_HASH},
        "checkpointOwner": {"S": WORKER_A},
        "streamName": {"S": STREAM_ID},
        "shardId": {"S": "shardId-000000000005"},
    }
    # Unowned, no lineage: no leaseOwner and no empty sets (DynamoDB has none).
    assert raw(boto, store.table, "shardId-000000000006") == {
        "leaseKey": {"S": "shardId-000000000006"},
        "leaseCounter": {"N": "0"},
        "checkpoint": {"S": "TRIM_HORIZON"},
        "checkpointSubSequenceNumber": {"N": "0"},
        "ownerSwitchesSinceCheckpoint": {"N": "0"},
    }
    table = boto.describe_table(TableName=store.table)["Table"]
    assert table["KeySchema"] == [{"AttributeName": "leaseKey", "KeyType": "HASH"}]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"


async def test_handoff_and_eviction_write_kcl3_attributes(store: DynamoDbLeaseStore, boto: Any) -> None:
    lease = Lease("shardId-000000000000", lease_owner=WORKER_A)
    await store.create_lease_if_absent(lease)
    started = await store.initiate_handoff(lease, WORKER_B)
    item = raw(boto, store.table, lease.lease_key)
    assert item is not None
    assert (item["leaseOwner"], item["checkpointOwner"]) == ({"S": WORKER_B}, {"S": WORKER_A})
    done = await store.complete_handoff(started, ExtendedSequenceNumber(SEQ))
    assert "checkpointOwner" not in (raw(boto, store.table, lease.lease_key) or {})
    await store.evict_lease(done)
    item = raw(boto, store.table, lease.lease_key)
    assert item is not None
    assert "leaseOwner" not in item
    assert (item["leaseCounter"], item["checkpoint"]) == ({"N": "3"}, {"S": SEQ})


@pytest.mark.parametrize(
    ("key_schema", "definitions", "shown"),
    [
        ([("id", "HASH")], [("id", "N")], "id (HASH, N)"),
        ([("leaseKey", "HASH")], [("leaseKey", "N")], "leaseKey (HASH, N)"),
        ([("leaseKey", "HASH"), ("app", "RANGE")], [("leaseKey", "S"), ("app", "S")], "app (RANGE, S)"),
    ],
)
async def test_a_table_of_another_key_schema_is_refused_naming_it(
    boto: Any,
    dynamodb_endpoint: str,
    dynamodb_table: str,
    key_schema: list[tuple[str, str]],
    definitions: list[tuple[str, str]],
    shown: str,
) -> None:
    boto.create_table(
        TableName=dynamodb_table,
        KeySchema=[{"AttributeName": n, "KeyType": t} for n, t in key_schema],
        AttributeDefinitions=[{"AttributeName": n, "AttributeType": t} for n, t in definitions],
        BillingMode="PAY_PER_REQUEST",
    )
    store = dynamodb_store(dynamodb_endpoint, dynamodb_table)
    with pytest.raises(StoreSchemaError, match="not a KCL lease table") as caught:
        await store.initialize()
    assert dynamodb_table in str(caught.value)
    assert shown in str(caught.value)
    with pytest.raises(StoreSchemaError):  # a store used without initialize() checks too
        await store.list_leases()
    await store.aclose()


async def test_missing_table_is_an_error_when_creation_is_off(
    dynamodb_endpoint: str, dynamodb_table: str
) -> None:
    store = dynamodb_store(dynamodb_endpoint, dynamodb_table, create_table=False)
    with pytest.raises(StoreError, match=f"'{dynamodb_table}'.*does not exist"):
        await store.get_lease("shardId-000000000000")
    await store.aclose()


async def test_a_table_deleted_under_the_store_is_a_store_error(store: DynamoDbLeaseStore, boto: Any) -> None:
    await store.initialize()
    boto.delete_table(TableName=store.table)
    with pytest.raises(StoreError, match="does not exist"):
        await store.list_leases()


async def test_url_without_a_table_uses_the_application_name(dynamodb_moto: str, dynamodb_table: str) -> None:
    url = f"dynamodb://?region={REGION}&endpoint_url={dynamodb_moto}"
    store = DynamoDbLeaseStore.from_url(url, dynamodb_table, credentials=CREDENTIALS)
    assert await store.create_lease_if_absent(Lease("shardId-000000000000"))
    assert store.table == dynamodb_table
    await store.aclose()


async def test_unreachable_endpoint_is_store_unavailable_quickly_and_without_secrets() -> None:
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = DynamoDbLeaseStore(
        "kb-nowhere",
        "app",
        region=REGION,
        endpoint_url=endpoint,
        credentials=type(CREDENTIALS)("AKIAEXAMPLEKEYID", secret, "session-token-secret"),
    )
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        await store.renew_lease(Lease("shardId-000000000000", lease_owner="a"))
    assert time.monotonic() - started < 3.0
    assert caught.value.retriable
    assert endpoint in str(caught.value)
    assert "kb-nowhere" in str(caught.value)
    for text in (str(caught.value), repr(store)):
        assert secret not in text
        assert "session-token-secret" not in text
    await store.aclose()
