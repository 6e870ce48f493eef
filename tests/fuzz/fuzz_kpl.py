"""Coverage-guided fuzzing of KPL de-aggregation with atheris.

Each input becomes the data of one record, in one of five shapes chosen by its first byte: the raw
bytes; ``MAGIC + bytes`` (nearly always a wrong MD5); ``MAGIC + bytes + MD5(bytes)``, which reaches
the protobuf parsers; the same with a hash-range filter; and a valid aggregate of entries drawn from
the input, maybe with one body byte overwritten (and its MD5 recomputed).

Checked on every run: ``deaggregate`` never raises and logs nothing at ERROR (its "unexpected error"
path); it returns the input record alone and unchanged, or sub-records with the parent's sequence
number and metadata, in order; and exactly what an independent reading with aws-kinesis-agg's
generated protobuf classes says: the same sub-records (minus those outside the hash range), or none
when that reading finds the record malformed.

Run: ``python tests/fuzz/fuzz_kpl.py -max_total_time=120`` (any libFuzzer flags; add a corpus
directory to keep what it finds). ``tests/unit/test_kpl.py`` runs it briefly.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import atheris
from aws_kinesis_agg import deaggregator, messages_pb2  # noqa: F401 - deaggregator puts config_pb2 on the path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: find tests.fuzz
from tests.fuzz import Entry, reference

with atheris.instrument_imports(include=["kinesis_butler.retrieval.kpl"]):
    from kinesis_butler.models import Record
    from kinesis_butler.retrieval.kpl import MAGIC, MAX_HASH_KEY, aggregate, deaggregate, effective_hash_key

HASH_RANGE = (2**126, 2**127 * 3)


def md5(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


class _FailOnError(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            raise AssertionError(f"deaggregate logged an error: {record.getMessage()}")


def _structured(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A valid aggregate of fuzzed entries, with one body byte maybe overwritten (MD5 kept valid)."""
    entries: list[Entry] = []
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        partition_key = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 4))
        explicit_hash_key = str(fdp.ConsumeIntInRange(0, MAX_HASH_KEY)) if fdp.ConsumeBool() else None
        entries.append((fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200)), partition_key, explicit_hash_key))
    body = bytearray(aggregate(entries)[4:-16])
    if fdp.ConsumeBool():
        body[fdp.ConsumeIntInRange(0, len(body) - 1)] = fdp.ConsumeInt(1) & 0xFF
    return MAGIC + body + md5(bytes(body))


def test_one_input(raw: bytes) -> None:
    if not raw:
        return
    mode, body = raw[0] % 5, raw[1:]
    hash_range = HASH_RANGE if mode == 3 or (mode == 4 and raw[-1] & 1) else None
    if mode == 0:
        data = body
    elif mode == 1:
        data = MAGIC + body
    elif mode in (2, 3):
        data = MAGIC + body + md5(body)
    else:
        data = _structured(atheris.FuzzedDataProvider(body))
    record = Record(data, "outer", "49590338271490256608559692538361571095921575989136588898", 1.5, "KMS")
    batch = [record]
    result = deaggregate(batch, hash_range=hash_range, shard_id="shardId-000000000000")
    if not data.startswith(MAGIC):
        assert result is batch
    expected = reference(data)
    if expected is None:
        assert len(result) == 1
        assert result[0] is record
        return
    if hash_range is not None:
        expected = [e for e in expected if hash_range[0] <= effective_hash_key(e[1], e[2]) <= hash_range[1]]
    assert [(s.data, s.partition_key, s.explicit_hash_key) for s in result] == expected
    previous = -1
    for sub in result:
        assert (sub.sequence_number, sub.approximate_arrival_timestamp, sub.encryption_type) == (
            record.sequence_number,
            1.5,
            "KMS",
        )
        assert sub.sub_sequence_number > previous
        previous = sub.sub_sequence_number
    if hash_range is None:
        assert [s.sub_sequence_number for s in result] == list(range(len(result)))


def main() -> None:
    logger = logging.getLogger("kinesis_butler.retrieval.kpl")
    logger.addHandler(_FailOnError())
    logger.propagate = False  # the expected warnings would flood the output
    logger.setLevel(logging.WARNING)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
