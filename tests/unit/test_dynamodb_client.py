"""DynamoDbClient and DynamoDbLeaseStore against a scripted transport: request bodies, retries,
condition failures, the KCL item codec and ``dynamodb://`` URLs. No network."""

from __future__ import annotations

import base64
import json
from collections import deque
from typing import Any

import aiohttp
import pytest

from kinesis_butler.aws.dynamodb import AttributeValue, ConditionFailed, DynamoDbClient, Expression
from kinesis_butler.aws.transport import TransportOptions
from kinesis_butler.errors import (
    ConditionalCheckFailed,
    ConfigError,
    EndpointUnreachable,
    InvalidArgument,
    ServiceUnavailable,
    StaleLease,
    StoreSchemaError,
    StoreUnavailable,
    Throttled,
)
from kinesis_butler.models import ExtendedSequenceNumber, Lease
from kinesis_butler.stores.dynamodb import DynamoDbLeaseStore, lease_from_item, lease_to_item

Answer = dict[str, Any] | bytes | Exception
SEQ = "49590338271490256608559692538361571095921575989136588898"
TABLE_OK = {
    "Table": {
        "TableName": "orders-app",
        "TableStatus": "ACTIVE",
        "KeySchema": [{"AttributeName": "leaseKey", "KeyType": "HASH"}],
        "AttributeDefinitions": [{"AttributeName": "leaseKey", "AttributeType": "S"}],
        "BillingModeSummary": {"BillingMode": "PAY_PER_REQUEST"},
        "ItemCount": 3,
    }
}


class ScriptedTransport:
    """Answers each call with the next scripted answer and records what was sent."""

    endpoint_url = "http://dynamodb.test:8000"
    region = "us-east-1"

    def __init__(self, *answers: Answer) -> None:
        self.answers: deque[Answer] = deque(answers)
        self.calls: list[tuple[str, dict[str, Any], int | None]] = []
        self.closed = False

    async def call(self, operation: str, body: bytes, *, max_attempts: int | None = None) -> bytes:
        self.calls.append((operation, json.loads(body), max_attempts))
        answer = self.answers.popleft()
        if isinstance(answer, Exception):
            raise answer
        return answer if isinstance(answer, bytes) else json.dumps(answer).encode()

    async def aclose(self) -> None:
        self.closed = True

    @property
    def operations(self) -> list[str]:
        return [operation for operation, _, _ in self.calls]


class Sleeps(list[float]):
    async def __call__(self, delay: float) -> None:
        self.append(delay)


def client(transport: ScriptedTransport, sleeps: Sleeps | None = None, attempts: int = 4) -> DynamoDbClient:
    options = TransportOptions(max_attempts=attempts, backoff_base=0.1, backoff_cap=1.0)
    return DynamoDbClient(
        transport=transport,
        transport_options=options,
        sleep=sleeps if sleeps is not None else Sleeps(),
        rand=lambda: 0.5,
    )


def failed() -> ConditionalCheckFailed:
    return ConditionalCheckFailed("The conditional request failed", operation="UpdateItem", code="x")


def unreachable(cause: BaseException) -> EndpointUnreachable:
    error = EndpointUnreachable("UpdateItem could not reach http://dynamodb.test:8000")
    error.__cause__ = cause
    return error


def refused() -> EndpointUnreachable:
    # Built without __init__: only its type matters here (the request never left the host).
    return unreachable(aiohttp.ClientConnectorError.__new__(aiohttp.ClientConnectorError))


# -- client request bodies ------------------------------------------------------------------


async def test_create_table_asks_for_on_demand_billing_and_a_string_lease_key() -> None:
    transport = ScriptedTransport({"TableDescription": TABLE_OK["Table"] | {"TableStatus": "CREATING"}})
    created = await client(transport).create_table("orders-app")
    assert transport.calls == [
        (
            "CreateTable",
            {
                "TableName": "orders-app",
                "KeySchema": [{"AttributeName": "leaseKey", "KeyType": "HASH"}],
                "AttributeDefinitions": [{"AttributeName": "leaseKey", "AttributeType": "S"}],
                "BillingMode": "PAY_PER_REQUEST",
            },
            None,
        )
    ]
    assert (created.table_status, created.billing_mode, created.item_count) == (
        "CREATING",
        "PAY_PER_REQUEST",
        3,
    )


async def test_describe_table_without_billing_summary_is_provisioned() -> None:
    table = {k: v for k, v in TABLE_OK["Table"].items() if k != "BillingModeSummary"}
    described = await client(ScriptedTransport({"Table": table})).describe_table("orders-app")
    assert described.billing_mode == "PROVISIONED"
    assert described.key_schema[0].attribute_name == "leaseKey"


async def test_get_item_reads_consistently_and_decodes_every_attribute_type() -> None:
    item = {
        "s": {"S": "x"},
        "n": {"N": "12.5"},
        "b": {"B": base64.b64encode(b"\x00\xff").decode()},
        "ss": {"SS": ["a", "b"]},
        "ns": {"NS": ["1", "2"]},
        "bs": {"BS": [base64.b64encode(b"z").decode()]},
        "m": {"M": {"inner": {"BOOL": False}}},
        "l": {"L": [{"NULL": True}, {"S": "y"}]},
    }
    transport = ScriptedTransport({"Item": item}, {})
    ddb = client(transport)
    got = await ddb.get_item("t", {"leaseKey": AttributeValue(S="k")})
    assert transport.calls[0] == (
        "GetItem",
        {"TableName": "t", "Key": {"leaseKey": {"S": "k"}}, "ConsistentRead": True},
        None,
    )
    assert got is not None
    assert got["b"] == AttributeValue(B=b"\x00\xff")
    assert got["bs"] == AttributeValue(BS=[b"z"])
    assert got["m"] == AttributeValue(M={"inner": AttributeValue(BOOL=False)})
    assert got["l"] == AttributeValue(L=[AttributeValue(NULL=True), AttributeValue(S="y")])
    assert await ddb.get_item("t", {"leaseKey": AttributeValue(S="gone")}) is None


async def test_scan_is_consistent_and_follows_every_page() -> None:
    transport = ScriptedTransport(
        {"Items": [{"leaseKey": {"S": "a"}}], "LastEvaluatedKey": {"leaseKey": {"S": "a"}}},
        {"Items": [{"leaseKey": {"S": "b"}}], "Count": 1},
    )
    items = await client(transport).scan("t", page_size=1)
    assert [item["leaseKey"].S for item in items] == ["a", "b"]
    assert [body for _, body, _ in transport.calls] == [
        {"TableName": "t", "ConsistentRead": True, "Limit": 1},
        {"TableName": "t", "ConsistentRead": True, "Limit": 1, "ExclusiveStartKey": {"leaseKey": {"S": "a"}}},
    ]


async def test_update_item_sends_placeholders_condition_and_both_return_value_options() -> None:
    transport = ScriptedTransport({"Attributes": {"leaseKey": {"S": "k"}, "leaseCounter": {"N": "6"}}})
    update = Expression().set("leaseCounter", AttributeValue(N="6")).remove("checkpointOwner")
    update.require_equal("leaseCounter", AttributeValue(N="5")).require_absent("leaseOwner")
    written = await client(transport).update_item("t", {"leaseKey": AttributeValue(S="k")}, update)
    assert written["leaseCounter"] == AttributeValue(N="6")
    assert transport.calls == [
        (
            "UpdateItem",
            {
                "TableName": "t",
                "Key": {"leaseKey": {"S": "k"}},
                "UpdateExpression": "SET #leaseCounter = :v0 REMOVE #checkpointOwner",
                "ConditionExpression": "#leaseCounter = :v1 AND attribute_not_exists(#leaseOwner)",
                "ExpressionAttributeNames": {
                    "#leaseCounter": "leaseCounter",
                    "#checkpointOwner": "checkpointOwner",
                    "#leaseOwner": "leaseOwner",
                },
                "ExpressionAttributeValues": {":v0": {"N": "6"}, ":v1": {"N": "5"}},
                "ReturnValues": "ALL_NEW",
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            },
            1,  # writes are retried by the client, one transport attempt at a time
        )
    ]


async def test_put_and_delete_send_their_conditions() -> None:
    transport = ScriptedTransport({}, {})
    ddb = client(transport)
    await ddb.put_item(
        "t", {"leaseKey": AttributeValue(S="k")}, condition=Expression().require_absent("leaseKey")
    )
    await ddb.delete_item("t", {"leaseKey": AttributeValue(S="k")})
    assert transport.calls[0][1] == {
        "TableName": "t",
        "Item": {"leaseKey": {"S": "k"}},
        "ConditionExpression": "attribute_not_exists(#leaseKey)",
        "ExpressionAttributeNames": {"#leaseKey": "leaseKey"},
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }
    assert transport.calls[1][1] == {"TableName": "t", "Key": {"leaseKey": {"S": "k"}}}


def test_expression_placeholders_are_readable_reused_and_safe_for_odd_names() -> None:
    update = (
        Expression()
        .set("leaseOwner", AttributeValue(S="a"))
        .require_equal("leaseOwner", AttributeValue(S="b"))
    )
    update.set("odd name.with-dots", AttributeValue(N="1")).increment("ownerSwitchesSinceCheckpoint")
    assert update.names == {
        "#leaseOwner": "leaseOwner",
        "#n1": "odd name.with-dots",
        "#ownerSwitchesSinceCheckpoint": "ownerSwitchesSinceCheckpoint",
    }
    assert update.update_expression == (
        "SET #leaseOwner = :v0, #n1 = :v2, #ownerSwitchesSinceCheckpoint = "
        "if_not_exists(#ownerSwitchesSinceCheckpoint, :v3) + :v4"
    )
    assert update.condition_expression == "#leaseOwner = :v1"
    assert Expression().update_expression is None
    assert Expression().request_fields() == {}


# -- write retries and condition failures -----------------------------------------------------


async def test_a_condition_failure_on_the_first_attempt_is_not_ambiguous() -> None:
    transport = ScriptedTransport(failed())
    with pytest.raises(ConditionFailed) as caught:
        await client(transport).update_item("t", {}, Expression().require_present("leaseKey"))
    assert (caught.value.ambiguous, caught.value.old_item_known, caught.value.old_item) == (
        False,
        False,
        None,
    )
    assert isinstance(caught.value, ConditionalCheckFailed)


async def test_the_old_item_comes_from_the_error_body_when_the_transport_keeps_it() -> None:
    error = failed()
    error.body = json.dumps(
        {"__type": "x#ConditionalCheckFailedException", "Item": {"leaseCounter": {"N": "9"}}}
    ).encode()  # type: ignore[attr-defined]
    absent = failed()
    absent.body = b'{"__type": "ConditionalCheckFailedException"}'  # type: ignore[attr-defined]
    ddb = client(ScriptedTransport(error, absent))
    for expected in ({"leaseCounter": AttributeValue(N="9")}, None):
        with pytest.raises(ConditionFailed) as caught:
            await ddb.delete_item("t", {}, condition=Expression().require_present("leaseKey"))
        assert (caught.value.old_item_known, caught.value.old_item) == (True, expected)


@pytest.mark.parametrize(
    ("first_failure", "ambiguous"),
    [
        (ServiceUnavailable("InternalServerError", status=500), True),
        (unreachable(TimeoutError()), True),
        (unreachable(aiohttp.ServerDisconnectedError()), True),
        (Throttled("ProvisionedThroughputExceededException", status=400), False),
        (refused(), False),
    ],
)
async def test_a_retry_after_a_failure_that_may_have_applied_is_ambiguous(
    first_failure: Exception, ambiguous: bool
) -> None:
    sleeps = Sleeps()
    transport = ScriptedTransport(first_failure, failed())
    with pytest.raises(ConditionFailed) as caught:
        await client(transport, sleeps).update_item("t", {}, Expression().require_present("leaseKey"))
    assert caught.value.ambiguous is ambiguous
    assert transport.operations == ["UpdateItem", "UpdateItem"]
    assert sleeps == [0.05]  # full jitter: rand() * min(cap, base * 2**0)


async def test_writes_give_up_after_the_attempt_budget_and_never_retry_a_bad_request() -> None:
    sleeps = Sleeps()
    transport = ScriptedTransport(*[ServiceUnavailable("boom", status=503) for _ in range(3)])
    with pytest.raises(ServiceUnavailable):
        await client(transport, sleeps, attempts=3).put_item("t", {})
    assert (len(transport.calls), sleeps) == (3, [0.05, 0.1])
    transport = ScriptedTransport(InvalidArgument("bad", code="ValidationException"))
    with pytest.raises(InvalidArgument):
        await client(transport).put_item("t", {})
    assert len(transport.calls) == 1


# -- the store over the scripted transport ----------------------------------------------------


def store(*answers: Answer, sleeps: Sleeps | None = None) -> tuple[DynamoDbLeaseStore, ScriptedTransport]:
    transport = ScriptedTransport(TABLE_OK, *answers)
    return DynamoDbLeaseStore("orders-app", "orders", client=client(transport, sleeps)), transport


def item(**attributes: Any) -> dict[str, Any]:
    base = {
        "leaseKey": {"S": "shardId-000000000001"},
        "leaseCounter": {"N": "5"},
        "checkpoint": {"S": SEQ},
        "checkpointSubSequenceNumber": {"N": "0"},
        "ownerSwitchesSinceCheckpoint": {"N": "0"},
    }
    return base | attributes


async def test_take_is_one_conditional_update_in_kcl_terms() -> None:
    answer = item(leaseOwner={"S": "b"}, leaseCounter={"N": "6"}, ownerSwitchesSinceCheckpoint={"N": "1"})
    lease_store, transport = store({"Attributes": answer})
    taken = await lease_store.take_lease(Lease("shardId-000000000001", lease_owner="a", lease_counter=5), "b")
    assert (taken.lease_owner, taken.lease_counter, taken.owner_switches_since_checkpoint) == ("b", 6, 1)
    operation, body, _ = transport.calls[1]
    assert operation == "UpdateItem"
    assert body["UpdateExpression"] == (
        "SET #leaseOwner = :v0, #ownerSwitchesSinceCheckpoint = "
        "if_not_exists(#ownerSwitchesSinceCheckpoint, :v1) + :v2, #leaseCounter = :v3 REMOVE #checkpointOwner"
    )
    assert body["ConditionExpression"] == "#leaseCounter = :v4 AND #leaseOwner = :v5"
    assert body["ExpressionAttributeValues"] == {
        ":v0": {"S": "b"},
        ":v1": {"N": "0"},
        ":v2": {"N": "1"},
        ":v3": {"N": "6"},
        ":v4": {"N": "5"},
        ":v5": {"S": "a"},
    }


async def test_checkpoint_replaces_pending_and_drops_the_kcl_pending_state() -> None:
    lease_store, transport = store({"Attributes": item(leaseCounter={"N": "6"})})
    await lease_store.checkpoint(
        Lease("shardId-000000000001", lease_owner="a", lease_counter=5), ExtendedSequenceNumber(SEQ)
    )
    update = transport.calls[1][1]["UpdateExpression"]
    assert update.startswith(
        "SET #checkpoint = :v0, #checkpointSubSequenceNumber = :v1, #ownerSwitchesSinceCheckpoint"
    )
    assert update.endswith(
        "REMOVE #pendingCheckpoint, #pendingCheckpointSubSequenceNumber, #pendingCheckpointState"
    )


async def test_a_renewal_whose_first_attempt_applied_is_not_reported_stale() -> None:
    # The first attempt timed out after DynamoDB applied it; the retry then fails its condition
    # against our own write. The KCL recovers from this too ("spurious renewal failure").
    ours = item(leaseOwner={"S": "a"}, leaseCounter={"N": "6"}, throughputKBps={"N": "1.5"})
    lease_store, transport = store(unreachable(TimeoutError()), failed(), {"Item": ours})
    renewed = await lease_store.renew_lease(Lease("shardId-000000000001", lease_owner="a", lease_counter=5))
    assert renewed.lease_counter == 6
    assert transport.operations == ["DescribeTable", "UpdateItem", "UpdateItem", "GetItem"]


async def test_a_renewal_that_lost_to_another_writer_is_stale_even_after_a_retry() -> None:
    theirs = item(leaseOwner={"S": "b"}, leaseCounter={"N": "6"})
    lease_store, _ = store(ServiceUnavailable("x", status=500), failed(), {"Item": theirs})
    with pytest.raises(StaleLease, match="moved on to 6") as caught:
        await lease_store.renew_lease(Lease("shardId-000000000001", lease_owner="a", lease_counter=5))
    assert (caught.value.lease_key, caught.value.expected_counter) == ("shardId-000000000001", 5)


async def test_a_delete_or_create_whose_first_attempt_applied_succeeds() -> None:
    lease = Lease("shardId-000000000001", lease_counter=5, checkpoint=ExtendedSequenceNumber(SEQ))
    lease_store, _ = store(
        unreachable(TimeoutError()), failed(), {}, unreachable(TimeoutError()), failed(), {"Item": item()}
    )
    await lease_store.delete_lease(lease)
    assert await lease_store.create_lease_if_absent(lease) is True


async def test_throttling_through_every_attempt_is_store_unavailable() -> None:
    lease_store, transport = store(*[Throttled("slow down", code="ThrottlingException") for _ in range(4)])
    with pytest.raises(StoreUnavailable, match=r"orders-app.*could not renew lease 'k'.*slow down"):
        await lease_store.renew_lease(Lease("k", lease_owner="a"))
    assert transport.operations.count("UpdateItem") == 4


async def test_closing_the_store_leaves_a_passed_in_client_open() -> None:
    lease_store, transport = store()
    await lease_store.aclose()
    assert not transport.closed


# -- the KCL item codec ------------------------------------------------------------------------


def test_codec_round_trips_and_leaves_out_what_the_kcl_leaves_out() -> None:
    lease = Lease("shardId-000000000001", checkpoint=ExtendedSequenceNumber(SEQ, 2))
    encoded = lease_to_item(lease)
    assert set(encoded) == {
        "leaseKey",
        "leaseCounter",
        "checkpoint",
        "checkpointSubSequenceNumber",
        "ownerSwitchesSinceCheckpoint",
    }
    assert lease_from_item(encoded) == lease


def test_codec_reads_kcl_extras_and_skips_other_entities() -> None:
    kcl = {name: AttributeValue(**value) for name, value in item(throughputKBps={"N": "3.25"}).items()}
    assert lease_from_item(kcl) == Lease(
        "shardId-000000000001", lease_counter=5, checkpoint=ExtendedSequenceNumber(SEQ)
    )
    assert lease_from_item(kcl | {"entityType": AttributeValue(S="LEASE")}) is not None
    assert lease_from_item(kcl | {"entityType": AttributeValue(S="LEADER")}) is None


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ({"checkpoint": {"S": "not-a-number"}}, "invalid sequence number"),
        ({"leaseCounter": {"S": "5"}}, "leaseCounter is not of type N"),
        ({"parentShardId": {"S": "shardId-0"}}, "parentShardId"),
    ],
)
def test_codec_refuses_items_that_are_not_kcl_leases_naming_table_and_key(
    broken: dict[str, Any], reason: str
) -> None:
    bad = {name: AttributeValue(**value) for name, value in (item() | broken).items()}
    with pytest.raises(StoreSchemaError, match=f"'orders-app'.*'shardId-000000000001'.*{reason}"):
        lease_from_item(bad, "orders-app")
    del bad["leaseCounter"]
    with pytest.raises(StoreSchemaError, match="lacks one of"):
        lease_from_item(bad, "orders-app")


# -- dynamodb:// URLs -----------------------------------------------------------------------


def test_url_names_table_region_endpoint_and_options() -> None:
    url = "dynamodb://orders-leases?region=eu-west-1&endpoint_url=http://127.0.0.1:8000&create_table=false"
    lease_store = DynamoDbLeaseStore.from_url(url, "orders")
    assert (lease_store.table, lease_store.app) == ("orders-leases", "orders")
    assert lease_store._client.region == "eu-west-1"
    assert lease_store._client.endpoint_url == "http://127.0.0.1:8000"
    assert lease_store._create_table is False
    assert repr(lease_store) == (
        "DynamoDbLeaseStore(table='orders-leases', app='orders', endpoint_url='http://127.0.0.1:8000')"
    )


def test_url_without_a_table_uses_the_application_name_as_the_kcl_does() -> None:
    assert DynamoDbLeaseStore.from_url("dynamodb://?region=us-east-1", "orders-app").table == "orders-app"
    assert DynamoDbLeaseStore.from_url("dynamodb:///", "orders-app").table == "orders-app"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("dynamodb://t1?aws_secret_access_key=hunter2hunter2", "unknown option 'aws_secret_access_key'"),
        ("dynamodb://AKID:hunter2hunter2@t1", "credentials do not belong in the URL"),
        ("dynamodb://t1?create_table=maybe", "create_table must be true or false"),
        ("dynamodb://t1?region=a&region=b", "given twice"),
        ("dynamodb://t1/path", "no path"),
        ("postgresql://t1", "not dynamodb"),
    ],
)
def test_bad_urls_are_config_errors_that_never_echo_values(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as caught:
        DynamoDbLeaseStore.from_url(url, "orders-app")
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("table", ["ab", "has space", "x" * 256, "slash/name"])
def test_invalid_table_names_are_config_errors(table: str) -> None:
    with pytest.raises(ConfigError, match="invalid DynamoDB table name"):
        DynamoDbLeaseStore(table, "app", region="us-east-1")
    with pytest.raises(ConfigError, match="name a table instead"):
        DynamoDbLeaseStore(None, "ab", region="us-east-1")
