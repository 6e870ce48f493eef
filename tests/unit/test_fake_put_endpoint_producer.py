"""AsyncProducer over HTTP against the in-repo fake endpoint with injected failures: partial
PutRecords failures and whole-call 500s and throttles are retried, every record is stored exactly
once, ``ordered=True`` keeps each key's put order, and a non-retriable code fails only its record."""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from collections.abc import AsyncIterator

import pytest

from kinesis_butler.aws import AwsCredentials, KinesisClient, TransportOptions
from kinesis_butler.config import ProducerConfig
from kinesis_butler.errors import RecordFailed
from kinesis_butler.models import Record
from kinesis_butler.producer import AsyncProducer
from kinesis_butler.retrieval.kpl import deaggregate
from kinesis_butler.testing.fake_put_endpoint import FakePutEndpoint

STREAM = "orders"
COUNT, KEYS = 2000, 25
FAST_RETRIES = {"retry_base": 0.001, "retry_cap": 0.01, "max_attempts": 60, "linger": 0.002}


@pytest.fixture
async def endpoint() -> AsyncIterator[FakePutEndpoint]:
    async with FakePutEndpoint({STREAM: 4}) as server:
        yield server


@pytest.fixture
async def client(endpoint: FakePutEndpoint) -> AsyncIterator[KinesisClient]:
    options = TransportOptions(backoff_base=0.001, backoff_cap=0.01, max_attempts=3)
    async with KinesisClient(
        endpoint_url=endpoint.url,
        region="us-east-1",
        credentials=AwsCredentials("test", "test"),
        transport_options=options,
    ) as kinesis:
        yield kinesis


def stored_records(endpoint: FakePutEndpoint) -> list[Record]:
    """Every stored record, aggregates expanded; each shard in sequence order."""
    plain = [
        Record(
            data=r.data, partition_key=r.partition_key, sequence_number=r.sequence_number, shard_id=r.shard_id
        )
        for r in endpoint.stored(STREAM)
    ]
    return deaggregate(plain)


def payload(n: int) -> bytes:
    return json.dumps({"n": n}).encode()


def key(n: int) -> str:
    return f"key-{n % KEYS}"


@pytest.mark.parametrize("aggregate", [False, True], ids=["plain", "aggregated"])
@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered"])
async def test_injected_failures_are_retried_and_every_record_is_stored_once(
    endpoint: FakePutEndpoint, client: KinesisClient, aggregate: bool, ordered: bool
) -> None:
    endpoint.set_failure_rate(0.3, seed=11)
    endpoint.fail_next_calls(2)  # whole-call 500 InternalFailure (the transport retries these)
    endpoint.fail_next_calls(1, status=400, code="ProvisionedThroughputExceededException")
    config = ProducerConfig(aggregate=aggregate, ordered=ordered, max_batch_records=100, **FAST_RETRIES)
    async with AsyncProducer(STREAM, client=client, config=config) as producer:
        handles = [await producer.put(payload(n), key(n)) for n in range(COUNT)]
        await producer.flush()
        results = [await handle for handle in handles]

    assert endpoint.failed_entries > 0  # the failures were really injected, and then retried
    assert endpoint.calls["PutRecords"] > 3
    records = stored_records(endpoint)
    numbers = [json.loads(r.data)["n"] for r in records]
    assert Counter(numbers) == Counter(range(COUNT))  # every record exactly once
    if not aggregate:
        assert len(endpoint.stored(STREAM)) == COUNT
    # Each handle names the shard and sequence number its record was stored under.
    where = {json.loads(r.data)["n"]: (r.shard_id, r.sequence_number) for r in records}
    assert [(res.shard_id, res.sequence_number) for res in results] == [where[n] for n in range(COUNT)]

    per_key: dict[str, list[int]] = defaultdict(list)
    for record in records:  # a key maps to one shard, and each shard is in sequence order
        per_key[record.partition_key].append(json.loads(record.data)["n"])
    in_put_order = all(numbers == [n for n in range(COUNT) if key(n) == k] for k, numbers in per_key.items())
    if ordered:
        assert in_put_order
    elif not aggregate:
        assert not in_put_order  # 30% failures without ordering do reorder: the check has teeth


async def test_non_retriable_code_fails_only_that_record(
    endpoint: FakePutEndpoint, client: KinesisClient
) -> None:
    config = ProducerConfig(aggregate=False, **FAST_RETRIES)
    async with AsyncProducer(STREAM, client=client, config=config) as producer:
        endpoint.fail_next_entries(1, code="KMSAccessDeniedException")
        doomed = await producer.put(b"doomed", "k")
        await producer.flush()  # the doomed record is alone in its call: it gets the scripted code
        endpoint.fail_next_entries(5)  # retriable: these succeed on a later try
        handles = [await producer.put(payload(n), key(n)) for n in range(50)]
        await producer.flush()
        with pytest.raises(RecordFailed) as failure:
            await doomed
        assert failure.value.code == "KMSAccessDeniedException"
        assert failure.value.attempts == 1
        results = [await handle for handle in handles]
    assert len(results) == 50
    assert sorted(json.loads(r.data)["n"] for r in endpoint.stored(STREAM)) == list(range(50))


async def test_retries_run_out_and_the_handle_says_so(
    endpoint: FakePutEndpoint, client: KinesisClient
) -> None:
    config = ProducerConfig(aggregate=False, **{**FAST_RETRIES, "max_attempts": 3})
    endpoint.fail_next_entries(3)
    async with AsyncProducer(STREAM, client=client, config=config) as producer:
        handle = await producer.put(b"unlucky", "k")
        await producer.flush()
        with pytest.raises(RecordFailed) as failure:
            await handle
    assert failure.value.code == "ProvisionedThroughputExceededException"
    assert failure.value.attempts == 3
    assert endpoint.stored(STREAM) == []


async def test_endpoint_speaks_put_record_list_shards_and_describe(
    endpoint: FakePutEndpoint, client: KinesisClient
) -> None:
    summary = await client.describe_stream_summary(STREAM)
    assert (summary.stream_name, summary.stream_status, summary.open_shard_count) == (STREAM, "ACTIVE", 4)
    shards = await client.list_shards(STREAM)
    assert [s.shard_id for s in shards] == [f"shardId-{i:012d}" for i in range(4)]
    assert all(a.ending_hash_key + 1 == b.starting_hash_key for a, b in itertools.pairwise(shards))
    assert shards[0].starting_hash_key == 0
    assert shards[-1].ending_hash_key == 2**128 - 1
    first = await client.put_record(STREAM, b"a", "same-key")
    second = await client.put_record(STREAM, b"b", "same-key")
    assert first.shard_id == second.shard_id
    assert int(second.sequence_number) > int(first.sequence_number)
    low = await client.put_record(STREAM, b"c", "x", explicit_hash_key="0")
    assert low.shard_id == "shardId-000000000000"
    assert [r.data for r in endpoint.stored(STREAM, first.shard_id)][:2] == [b"a", b"b"]
