"""KPL aggregated records: our encoder and decoder, cross-checked against aws-kinesis-agg."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from aws_kinesis_agg import deaggregator, messages_pb2  # deaggregator first: it puts config_pb2 on the path
from aws_kinesis_agg.aggregator import AggRecord, RecordAggregator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kinesis_butler.models import Record
from kinesis_butler.retrieval import kpl
from kinesis_butler.retrieval.kpl import (
    MAGIC,
    MAX_HASH_KEY,
    Aggregator,
    aggregate,
    deaggregate,
    effective_hash_key,
    partition_key_hash,
)
from tests.fuzz import Entry, reference, run_harness

SEQ = "49590338271490256608559692538361571095921575989136588898"
SHARD = "shardId-000000000007"
REPO = Path(__file__).resolve().parents[2]


def parent(data: bytes, sequence_number: str = SEQ) -> Record:
    return Record(data, "outer-key", sequence_number, 1795431832.505, "KMS", 0, SHARD, "orders")


def wrap(body: bytes) -> bytes:
    """An aggregate around a hand-written protobuf body, with a correct digest."""
    return MAGIC + body + hashlib.md5(body, usedforsecurity=False).digest()


def triples(records: list[Record]) -> list[Entry]:
    return [(r.data, r.partition_key, r.explicit_hash_key) for r in records]


ENTRIES: list[Entry] = [
    (b"first", "user-1", None),
    (b"", "user-2", None),  # empty data is allowed
    (b"x" * 300, "user-1", None),  # a repeated partition key, data longer than one varint byte
    (b"\x00\xff", "ünïcödé ✓", None),
    (b"with-ehk", "user-3", "12345"),
    (b"same-ehk", "user-4", "12345"),
    (b"max-ehk", "user-4", str(MAX_HASH_KEY)),
]


class _Capture(logging.Handler):
    """Collects kpl log records (hypothesis tests cannot use the function-scoped caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def kpl_log() -> Iterator[_Capture]:
    handler = _Capture()
    logger = logging.getLogger("kinesis_butler.retrieval.kpl")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(previous)


# --- round trips and the reference implementation ------------------------------------------------


@pytest.mark.parametrize(
    "entries",
    [ENTRIES, [(d, pk, None) for d, pk, _ in ENTRIES]],  # without explicit hash keys: the columnar path
    ids=["hash-keys", "no-hash-keys"],
)
def test_roundtrip_keeps_entries_order_and_parent_metadata(entries: list[Entry]) -> None:
    record = parent(aggregate(entries))
    subs = deaggregate([record])
    assert triples(subs) == entries
    assert [s.sub_sequence_number for s in subs] == list(range(len(entries)))
    for sub in subs:
        assert sub.sequence_number == SEQ
        assert sub.approximate_arrival_timestamp == 1795431832.505
        assert sub.encryption_type == "KMS"
        assert (sub.shard_id, sub.stream) == (SHARD, "orders")
        assert sub.extended_sequence_number.sequence == SEQ


def test_single_entry_aggregate_is_valid() -> None:
    subs = deaggregate([parent(aggregate([(b"only", "k", None)]))])
    assert triples(subs) == [(b"only", "k", None)]
    assert subs[0].sub_sequence_number == 0


def test_key_tables_are_deduplicated() -> None:
    blob = aggregate([(b"a", "k1", "7"), (b"b", "k1", "7"), (b"c", "k2", None)])
    message = messages_pb2.AggregatedRecord.FromString(blob[4:-16])
    assert list(message.partition_key_table) == ["k1", "k2"]
    assert list(message.explicit_hash_key_table) == ["7"]
    assert [r.partition_key_index for r in message.records] == [0, 0, 1]
    assert [r.HasField("explicit_hash_key_index") for r in message.records] == [True, True, False]


def test_encoding_is_byte_identical_to_aws_kinesis_agg() -> None:
    reference = AggRecord()
    for data, partition_key, explicit_hash_key in ENTRIES:
        assert reference.add_user_record(partition_key, data, explicit_hash_key)
    assert reference.get_contents()[2] == aggregate(ENTRIES)


def lambda_event_record(data: bytes, sequence_number: str = SEQ) -> dict[str, object]:
    """A record as Lambda delivers it, the shape aws-kinesis-agg's deaggregate_records reads."""
    return {
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": "outer-key",
            "sequenceNumber": sequence_number,
            "data": base64.b64encode(data).decode(),
            "approximateArrivalTimestamp": 1795431832.505,
        },
        "eventSource": "aws:kinesis",
    }


@pytest.mark.parametrize("with_hash_keys", [False, True])
def test_aws_kinesis_agg_reads_what_we_write(with_hash_keys: bool) -> None:
    # aws-kinesis-agg reads explicit_hash_key_table[0] for sub-records without an index whenever the
    # table is not empty, so each case uses hash keys for all entries or for none.
    entries = [(d, pk, str(i * 1000) if with_hash_keys else None) for i, (d, pk, _) in enumerate(ENTRIES)]
    theirs = deaggregator.deaggregate_records([lambda_event_record(aggregate(entries))])
    assert [
        (
            base64.b64decode(r["kinesis"]["data"]),
            r["kinesis"]["partitionKey"],
            r["kinesis"]["explicitHashKey"],
        )
        for r in theirs
    ] == entries
    assert [r["kinesis"]["subSequenceNumber"] for r in theirs] == list(range(len(entries)))
    assert {r["kinesis"]["sequenceNumber"] for r in theirs} == {SEQ}


def test_we_read_what_aws_kinesis_agg_writes() -> None:
    blobs: list[bytes] = []
    aggregator = RecordAggregator(max_size=2_000)  # several aggregates
    aggregator.on_record_complete(
        lambda agg: blobs.append(agg.get_contents()[2]), execute_on_new_thread=False
    )
    entries: list[Entry] = [
        (f"payload-{i}".encode() * (i % 7), f"key-{i % 13}", str(i * 7919) if i % 3 == 0 else None)
        for i in range(200)
    ]
    for data, partition_key, explicit_hash_key in entries:
        aggregator.add_user_record(partition_key, data, explicit_hash_key)
    last = aggregator.clear_and_get()
    assert last is not None
    blobs.append(last.get_contents()[2])
    assert len(blobs) > 3
    records = [parent(blob, str(1000 + i)) for i, blob in enumerate(blobs)]
    subs = deaggregate(records)
    assert triples(subs) == entries
    for record in records:
        numbers = [s.sub_sequence_number for s in subs if s.sequence_number == record.sequence_number]
        assert numbers == list(range(len(numbers)))


def test_aws_kinesis_agg_and_we_agree_on_plain_and_corrupt_records() -> None:
    blobs = [b"plain", MAGIC + b"\x00" * 16, aggregate(ENTRIES)[:-1], wrap(b"\xff\xff\xff")]
    theirs = deaggregator.deaggregate_records([lambda_event_record(b, str(i)) for i, b in enumerate(blobs)])
    ours = deaggregate([parent(b, str(i)) for i, b in enumerate(blobs)])
    assert [base64.b64decode(r["kinesis"]["data"]) for r in theirs] == [r.data for r in ours] == blobs


# --- hash keys and hash-range filtering ---------------------------------------------------------


def test_partition_key_hash_is_md5_as_big_endian_integer() -> None:
    assert partition_key_hash("") == int("d41d8cd98f00b204e9800998ecf8427e", 16)
    assert partition_key_hash("ü") == int(hashlib.md5("ü".encode(), usedforsecurity=False).hexdigest(), 16)
    assert effective_hash_key("ü", None) == partition_key_hash("ü")
    assert effective_hash_key("ü", "42") == 42
    assert effective_hash_key("k", str(MAX_HASH_KEY)) == MAX_HASH_KEY


@pytest.mark.parametrize("bad", ["", "-1", "1.5", " 1", "0x10", "١٢", str(MAX_HASH_KEY + 1), "9" * 5000])
def test_invalid_explicit_hash_keys_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid explicit hash key"):
        effective_hash_key("k", bad)
    aggregator = Aggregator()
    with pytest.raises(ValueError, match="invalid explicit hash key"):
        aggregator.size_with(b"x", "k", bad)
    with pytest.raises(ValueError, match="invalid explicit hash key"):
        aggregator.add(b"x", "k", bad)
    assert len(aggregator) == 0
    assert aggregator.size == 20


def test_hash_range_is_inclusive_and_keeps_sub_sequence_numbers(kpl_log: _Capture) -> None:
    entries: list[Entry] = [(str(k).encode(), f"pk{k}", str(k)) for k in (99, 100, 150, 200, 201)]
    subs = deaggregate([parent(aggregate(entries))], hash_range=(100, 200))
    assert [(s.data, s.sub_sequence_number) for s in subs] == [(b"100", 1), (b"150", 2), (b"200", 3)]
    assert [r.levelno for r in kpl_log.records] == [logging.WARNING]
    assert "dropped 2 " in kpl_log.records[0].getMessage()


def test_hash_range_uses_the_partition_key_hash_without_explicit_hash_key() -> None:
    key = "customer-42"
    hashed = partition_key_hash(key)
    record = parent(aggregate([(b"a", key, None), (b"b", "other", str(hashed)), (b"c", "other", None)]))
    assert partition_key_hash("other") != hashed
    kept = deaggregate([record], hash_range=(hashed, hashed))
    assert [(s.data, s.sub_sequence_number) for s in kept] == [(b"a", 0), (b"b", 1)]
    without_hash_keys = parent(aggregate([(b"c", "other", None), (b"a", key, None)]))  # the columnar path
    kept = deaggregate([without_hash_keys], hash_range=(hashed, hashed))
    assert [(s.data, s.sub_sequence_number) for s in kept] == [(b"a", 1)]
    above = deaggregate([record], hash_range=(hashed + 1, MAX_HASH_KEY))
    below = deaggregate([record], hash_range=(0, hashed - 1))
    assert [s.data for s in above + below] == [b"c"]


def test_dropped_count_is_logged_once_per_batch(kpl_log: _Capture) -> None:
    entries: list[Entry] = [(b"in", "k", "10"), (b"out", "k", "11")]
    batch = [parent(aggregate(entries), str(i)) for i in range(3)] + [parent(b"plain")]
    result = deaggregate(batch, hash_range=(0, 10), shard_id=SHARD)
    assert [r.data for r in result] == [b"in", b"in", b"in", b"plain"]
    assert len(kpl_log.records) == 1
    message = kpl_log.records[0].getMessage()
    assert "dropped 3 " in message
    assert SHARD in message


def test_full_hash_range_drops_nothing(kpl_log: _Capture) -> None:
    record = parent(aggregate(ENTRIES))
    assert deaggregate([record], hash_range=(0, MAX_HASH_KEY)) == deaggregate([record])
    assert kpl_log.records == []


def test_aggregate_entirely_outside_the_range_yields_nothing() -> None:
    assert deaggregate([parent(aggregate([(b"a", "k", "5"), (b"b", "k", "6")]))], hash_range=(7, 9)) == []


# --- plain records and malformed aggregates ------------------------------------------------------


def test_plain_records_pass_through_as_the_same_list() -> None:
    batch = [parent(b"plain"), parent(b""), parent(b"\xf3\x89\x9a"), parent(b"\xf3\x00\x00\x00rest")]
    assert deaggregate(batch) is batch
    assert deaggregate(batch, hash_range=(0, 1)) is batch
    empty: list[Record] = []
    assert deaggregate(empty) is empty


def body_with_bad_pk_index() -> bytes:
    return b"\x0a\x01a" + b"\x1a\x05\x08\x01\x1a\x01x"  # one key, a record pointing at key 1


def body_with_bad_ehk_index() -> bytes:
    return b"\x0a\x01a" + b"\x1a\x07\x08\x00\x10\x00\x1a\x01x"  # no hash keys, a record pointing at one


MALFORMED = {
    "magic only": MAGIC,
    "too short": MAGIC + b"\x00" * 16,
    "empty body": wrap(b""),  # the KCL needs more than 16 bytes after the magic
    "wrong md5": aggregate(ENTRIES)[:-1] + b"\x00",
    "truncated": aggregate(ENTRIES)[:-1],
    "body byte flipped": aggregate(ENTRIES)[:10] + b"\x00" + aggregate(ENTRIES)[11:],
    "garbage after magic": wrap(b"\xff" * 40),
    "truncated protobuf": wrap(aggregate(ENTRIES)[4:-20]),
    "pk index out of range": wrap(body_with_bad_pk_index()),
    "ehk index out of range": wrap(body_with_bad_ehk_index()),
    "huge pk index": wrap(b"\x0a\x01a" + b"\x1a\x0e\x08" + b"\xff" * 9 + b"\x01" + b"\x1a\x01x"),
    "missing data": wrap(b"\x0a\x01a\x1a\x02\x08\x00"),
    "missing pk index": wrap(b"\x0a\x01a\x1a\x03\x1a\x01x"),
    "invalid utf-8 key": wrap(b"\x0a\x02\xff\xfe\x1a\x05\x08\x00\x1a\x01x"),
    "non-numeric hash key": wrap(b"\x0a\x01a\x12\x03abc\x1a\x07\x08\x00\x10\x00\x1a\x01x"),
    "pk index out of range with a hash key": wrap(b"\x0a\x01a\x12\x015\x1a\x07\x08\x03\x10\x00\x1a\x01x"),
    "hash key above 2**128": wrap(
        b"\x0a\x01a\x12\x27" + str(2**128).encode() + b"\x1a\x07\x08\x00\x10\x00\x1a\x01x"
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
@pytest.mark.parametrize("hash_range", [None, (0, 2**127)])
def test_malformed_aggregates_are_delivered_unchanged(
    name: str, hash_range: tuple[int, int] | None, kpl_log: _Capture
) -> None:
    record = parent(MALFORMED[name])
    result = deaggregate([record], hash_range=hash_range)
    assert len(result) == 1
    assert result[0] is record
    assert [r.levelno for r in kpl_log.records] == [logging.WARNING]
    message = kpl_log.records[0].getMessage()
    assert SHARD in message
    assert SEQ in message


def test_warning_names_the_shard_passed_in(kpl_log: _Capture) -> None:
    record = Record(MAGIC + b"junk", "k", "17")
    deaggregate([record], shard_id="shardId-000000000042")
    assert "shard shardId-000000000042, record 17" in kpl_log.records[0].getMessage()


def test_valid_aggregate_without_sub_records_yields_nothing(kpl_log: _Capture) -> None:
    assert deaggregate([parent(wrap(b"\x0a\x01a"))]) == []  # a key table, no records
    assert kpl_log.records == []


def test_unexpected_errors_deliver_the_record_and_log_an_error(
    monkeypatch: pytest.MonkeyPatch, kpl_log: _Capture
) -> None:
    def broken(*args: object) -> int:
        raise RuntimeError("bug")

    monkeypatch.setattr(kpl, "_expand", broken)
    record = parent(aggregate(ENTRIES))
    assert deaggregate([record, parent(b"plain")]) == [record, parent(b"plain")]
    assert [r.levelno for r in kpl_log.records] == [logging.ERROR]


def test_mixed_batch_keeps_order() -> None:
    batch = [
        parent(b"p0", "1"),
        parent(aggregate([(b"a0", "k", None), (b"a1", "k", None), (b"a2", "j", None)]), "2"),
        parent(b"p1", "3"),
        parent(MALFORMED["wrong md5"], "4"),
        parent(aggregate([(b"b0", "k", "1")]), "5"),
        parent(b"p2", "6"),
    ]
    result = deaggregate(batch)
    assert [(r.data, r.sequence_number, r.sub_sequence_number) for r in result] == [
        (b"p0", "1", 0),
        (b"a0", "2", 0),
        (b"a1", "2", 1),
        (b"a2", "2", 2),
        (b"p1", "3", 0),
        (MALFORMED["wrong md5"], "4", 0),
        (b"b0", "5", 0),
        (b"p2", "6", 0),
    ]
    assert result[0] is batch[0]


def pb_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes([*out, value])


def pb_len(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + pb_varint(len(payload)) + payload


small = st.integers(0, 2) | st.integers(0, 2**64 - 1)
# Fields of one sub-record: the usual ones, and the unusual encodings the columnar view must not trust.
sub_fields = st.one_of(
    small.map(lambda v: b"\x08" + pb_varint(v)),  # partition_key_index
    st.lists(small, max_size=3).map(lambda vs: pb_len(0x0A, b"".join(map(pb_varint, vs)))),  # field 1, packed
    small.map(lambda v: b"\x10" + pb_varint(v)),  # explicit_hash_key_index
    st.lists(small, max_size=3).map(lambda vs: pb_len(0x12, b"".join(map(pb_varint, vs)))),  # field 2, packed
    st.binary(max_size=8).map(lambda d: pb_len(0x1A, d)),  # data
    st.just(b"\x18\x07"),  # field 3 as a varint: wrong wire type
    st.text(max_size=3).map(lambda k: pb_len(0x22, pb_len(0x0A, k.encode()))),  # a tag
    st.just(pb_len(0x22, b"\x12\x01v")),  # a tag without its required key
    st.just(b"\x28\x01"),  # an unknown field
)
canonical_record = st.tuples(st.integers(0, 1), st.binary(max_size=8)).map(
    lambda r: pb_len(0x1A, b"\x08" + pb_varint(r[0]) + pb_len(0x1A, r[1]))
)
top_fields = st.one_of(
    st.text(max_size=4).map(lambda k: pb_len(0x0A, k.encode())),
    st.binary(max_size=3).map(lambda k: pb_len(0x0A, k)),  # maybe not UTF-8
    st.sampled_from(["0", "42", str(MAX_HASH_KEY), "x", str(2**128)]).map(lambda k: pb_len(0x12, k.encode())),
    canonical_record,
    canonical_record,
    canonical_record,
    st.integers(0, 1).map(
        lambda i: pb_len(0x1A, b"\x08\x00\x10" + pb_varint(i) + b"\x1a\x00")
    ),  # with a hash key
    st.lists(sub_fields, max_size=5).map(lambda fs: pb_len(0x1A, b"".join(fs))),
    st.just(b"\x20\x01"),  # an unknown field
)


@given(
    st.sampled_from([b"", b"\x0a\x01a\x0a\x01b", b"\x0a\x01a\x0a\x01b\x12\x0242\x12\x010"]),
    st.lists(top_fields, max_size=10),
    st.booleans(),
)
@settings(max_examples=600, deadline=None)
def test_deaggregate_matches_an_independent_reading(
    tables: bytes, fields: list[bytes], filtered: bool
) -> None:
    data = wrap(tables + b"".join(fields))
    record = parent(data)
    expected = reference(data)
    result = deaggregate([record], hash_range=(0, MAX_HASH_KEY - 1) if filtered else None)
    if expected is None:
        assert len(result) == 1
        assert result[0] is record
        return
    kept = [e for e in expected if not filtered or effective_hash_key(e[1], e[2]) < MAX_HASH_KEY]
    assert triples(result) == kept


@pytest.mark.parametrize(
    ("sub_record", "expected"),
    [
        (b"\x08\x00\x08\x01\x1a\x01x", (b"x", "b")),  # field 1 twice: the last one counts
        (b"\x08\x00\x1a\x01x\x1a\x01y", (b"y", "a")),  # data twice
        (b"\x08\x00\x0a\x01\x01\x1a\x01x", (b"x", "a")),  # a packed field 1 is an unknown field here
    ],
)
def test_unusual_encodings_are_read_like_protobuf_does(
    sub_record: bytes, expected: tuple[bytes, str]
) -> None:
    data = wrap(b"\x0a\x01a\x0a\x01b" + pb_len(0x1A, sub_record) + pb_len(0x1A, b"\x08\x01\x1a\x01z"))
    assert reference(data) == [(*expected, None), (b"z", "b", None)]
    assert triples(deaggregate([parent(data)])) == [(*expected, None), (b"z", "b", None)]


# --- the Aggregator -----------------------------------------------------------------------------

partition_keys = st.sampled_from(["a", "b", "ключ", "k" * 256]) | st.text(min_size=1, max_size=20)
hash_keys = st.none() | st.sampled_from(["0", "1", str(MAX_HASH_KEY)]) | st.integers(0, MAX_HASH_KEY).map(str)
payloads = st.binary(max_size=300) | st.sampled_from([127, 128, 16383, 16384]).map(lambda n: b"\x01" * n)


@given(st.lists(st.tuples(payloads, partition_keys, hash_keys), min_size=1, max_size=40))
@settings(max_examples=150, deadline=None)
def test_size_prediction_is_exact(entries: list[Entry]) -> None:
    aggregator = Aggregator()
    for data, partition_key, explicit_hash_key in entries:
        predicted = aggregator.size_with(data, partition_key, explicit_hash_key)
        aggregator.add(data, partition_key, explicit_hash_key)
        assert aggregator.size == predicted
        assert len(aggregator.encode()) == predicted
    assert len(aggregator) == len(entries)
    assert triples(deaggregate([parent(aggregator.encode())])) == entries


def test_size_prediction_across_multi_byte_table_indices() -> None:
    aggregator = Aggregator()
    for i in range(20_000):  # indices beyond 127 and 16383 take two and three varint bytes
        args = (b"d", f"pk-{i}", str(i)) if i % 2 else (b"d", f"pk-{i}", None)
        predicted = aggregator.size_with(*args)
        aggregator.add(*args)
        assert aggregator.size == predicted
    blob = aggregator.encode()
    assert len(blob) == aggregator.size
    subs = deaggregate([parent(blob)])
    assert len(subs) == 20_000
    assert (subs[-1].partition_key, subs[-1].explicit_hash_key) == ("pk-19999", "19999")


def test_producer_loop_stops_at_a_size_limit() -> None:
    limit = 51_200  # the KPL's default AggregationMaxSize
    aggregator, blobs = Aggregator(), []
    entries: list[Entry] = [(bytes(100 + i % 50), f"key-{i % 100}", None) for i in range(3_000)]
    for entry in entries:
        if len(aggregator) and aggregator.size_with(*entry) > limit:
            blobs.append(aggregator.encode())
            aggregator.clear()
        aggregator.add(*entry)
    blobs.append(aggregator.encode())
    assert all(len(b) <= limit for b in blobs)
    assert max(len(b) for b in blobs) > limit - 200
    assert triples(deaggregate([parent(b) for b in blobs])) == entries


def test_aggregator_clear_len_and_empty() -> None:
    aggregator = Aggregator()
    with pytest.raises(ValueError, match="empty"):
        aggregator.encode()
    with pytest.raises(ValueError, match="empty"):
        aggregate([])
    aggregator.add(b"x", "k", None)
    assert len(aggregator) == 1
    aggregator.clear()
    assert len(aggregator) == 0
    assert aggregator.size == 20
    aggregator.add(b"y", "j", None)
    assert triples(deaggregate([parent(aggregator.encode())])) == [(b"y", "j", None)]


def test_routing_keys_follow_the_first_entry() -> None:
    aggregator = Aggregator()
    with pytest.raises(ValueError, match="empty"):
        aggregator.routing_keys()
    aggregator.add(b"x", "first", None)
    aggregator.add(b"y", "second", "5")
    assert aggregator.routing_keys() == ("first", str(partition_key_hash("first")))
    aggregator.clear()
    aggregator.add(b"y", "second", "5")
    assert aggregator.routing_keys() == ("second", "5")


# --- fuzzing ------------------------------------------------------------------------------------


@given(st.binary(max_size=2_000), st.booleans(), st.booleans())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_arbitrary_bytes_after_magic_never_raise(payload: bytes, valid_digest: bool, filtered: bool) -> None:
    data = wrap(payload) if valid_digest else MAGIC + payload
    record = parent(data)
    hash_range = (2**100, 2**127) if filtered else None
    result = deaggregate([record], hash_range=hash_range)
    if len(result) == 1 and result[0] is record:
        return
    previous = -1
    for sub in result:
        assert (sub.sequence_number, sub.shard_id, sub.encryption_type) == (SEQ, SHARD, "KMS")
        assert sub.sub_sequence_number > previous
        previous = sub.sub_sequence_number
        assert isinstance(sub.data, bytes)
        assert isinstance(sub.partition_key, str)


@given(st.lists(st.tuples(payloads, partition_keys, hash_keys), min_size=1, max_size=10), st.data())
@settings(max_examples=200, deadline=None)
def test_one_corrupted_byte_never_raises(entries: list[Entry], data: st.DataObject) -> None:
    body = bytearray(aggregate(entries)[4:-16])
    body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    record = parent(wrap(bytes(body)))
    result = deaggregate([record])
    assert (len(result) == 1 and result[0] is record) or all(s.sequence_number == SEQ for s in result)


def test_atheris_harness_runs_clean(tmp_path: Path) -> None:
    run_harness("fuzz_kpl.py", tmp_path)
