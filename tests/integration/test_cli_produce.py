"""``kinesis-butler produce``: the real command writes stdin's lines to the emulator, read back with
the consumer (every line once); bad lines, unknown streams, failed records and SIGTERM are reported
as docs/cli.md says."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from kinesis_butler import AsyncConsumer
from kinesis_butler.aws import KinesisClient
from kinesis_butler.models import Record
from kinesis_butler.retrieval.kpl import deaggregate
from kinesis_butler.testing.fake_put_endpoint import FakePutEndpoint
from tests.helpers import Collector, consume_until, wait_until_async
from tests.integration.conftest import FAST_CONSUMER, StreamFactory

pytestmark = pytest.mark.integration

CONSUMER = FAST_CONSUMER
COUNT, USERS = 600, 17


def _cli(*args: str, cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "kinesis_butler", "produce", *args],
        cwd=cwd,
        env=dict(os.environ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def _run(*args: str, cwd: Path, stdin: bytes) -> tuple[int, str]:
    process = _cli(*args, cwd=cwd)
    _, stderr = await asyncio.to_thread(process.communicate, stdin, 120)
    return process.returncode, stderr.decode()


def _lines(count: int) -> list[bytes]:
    return [json.dumps({"user": f"u{n % USERS}", "n": n}).encode() for n in range(count)]


async def _read_back(kinesis: KinesisClient, stream: str, count: int) -> Collector:
    collect = Collector()
    consumer = AsyncConsumer(stream, "app", collect, store="memory://", client=kinesis, config=CONSUMER)
    await consume_until(consumer, lambda: len(collect.records) >= count)
    return collect


@pytest.mark.parametrize(
    "flags",
    [
        ["--partition-key-field", "user", "--aggregate"],
        ["--partition-key-field", "user", "--no-aggregate", "--ordered"],
        ["--random-key", "--aggregate"],
        ["--random-key", "--no-aggregate"],
        [],
    ],
    ids=["field-aggregated", "field-plain-ordered", "random-aggregated", "random-plain", "md5-default"],
)
async def test_every_line_is_written_once(
    kinesis: KinesisClient,
    kinesis_endpoint: str,
    new_stream: StreamFactory,
    tmp_path: Path,
    flags: list[str],
) -> None:
    stream = await new_stream(2)
    lines = _lines(COUNT)
    code, stderr = await _run(
        "--stream", stream, *flags, "--endpoint-url", kinesis_endpoint, "--region", "us-east-1",
        cwd=tmp_path, stdin=b"\n".join(lines) + b"\n",
    )  # fmt: skip
    assert code == 0, stderr
    assert f"produced {COUNT} records to {stream} in " in stderr
    assert "; 0 failed; 0 skipped" in stderr
    assert "Traceback" not in stderr

    collect = await _read_back(kinesis, stream, COUNT)
    assert Counter(r.data for r in collect.records) == Counter(lines)  # every line once, no newline
    keys = {r.data: r.partition_key for r in collect.records}
    if "--partition-key-field" in flags:
        assert all(keys[line] == json.loads(line)["user"] for line in lines)
    elif "--random-key" in flags:
        assert len(set(keys.values())) > COUNT // 2
    else:
        assert all(keys[line] == hashlib.md5(line).hexdigest() for line in lines)  # noqa: S324
    if "--ordered" in flags:
        per_key: dict[str, list[int]] = defaultdict(list)
        for record in collect.records:
            per_key[record.partition_key].append(json.loads(record.data)["n"])
        for user, numbers in per_key.items():
            assert numbers == [n for n in range(COUNT) if f"u{n % USERS}" == user]


async def test_bad_lines_are_reported_by_number_and_the_rest_written(
    kinesis: KinesisClient, kinesis_endpoint: str, new_stream: StreamFactory, tmp_path: Path
) -> None:
    stream = await new_stream(1)
    good = _lines(50)
    stdin = b"\n".join(
        [*good[:10], b"not json", *good[10:20], b'{"other": 1}', b"[1, 2]", b'{"user": null}', *good[20:]]
    )  # no newline after the last line: it is a record too
    code, stderr = await _run(
        "--stream", stream, "--partition-key-field", "user", "--quiet",
        "--endpoint-url", kinesis_endpoint, "--region", "us-east-1", cwd=tmp_path, stdin=stdin,
    )  # fmt: skip
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("kinesis-butler: error: line ")]
    assert [line.split(":")[2].strip() for line in errors] == ["line 11", "line 22", "line 23", "line 24"]
    assert "not JSON" in errors[0]
    assert "no field 'user'" in errors[1]
    assert "not a JSON object" in errors[2]
    assert "NoneType" in errors[3]
    assert f"produced 50 records to {stream}" in stderr
    assert "; 0 failed; 4 skipped" in stderr
    collect = await _read_back(kinesis, stream, 50)
    assert Counter(r.data for r in collect.records) == Counter(good)


async def test_unknown_stream_is_one_line_and_exit_2(kinesis_endpoint: str, tmp_path: Path) -> None:
    code, stderr = await _run(
        "--stream", "no-such-stream", "--endpoint-url", kinesis_endpoint, "--region", "us-east-1",
        cwd=tmp_path, stdin=b"hello\n",
    )  # fmt: skip
    assert code == 2
    assert stderr.strip().splitlines() == [
        "kinesis-butler: error: stream 'no-such-stream' does not exist at this endpoint/region; "
        "check --stream, --region and --endpoint-url"
    ]


async def test_key_flags_exclude_each_other(tmp_path: Path) -> None:
    code, stderr = await _run(
        "--stream", "s", "--random-key", "--partition-key-field", "f", cwd=tmp_path, stdin=b""
    )
    assert code == 2
    assert "not allowed with argument" in stderr


async def test_sigterm_stops_reading_flushes_and_reports(
    kinesis: KinesisClient, kinesis_endpoint: str, new_stream: StreamFactory, tmp_path: Path
) -> None:
    stream = await new_stream(1)
    process = _cli(
        "--stream", stream, "--quiet", "--endpoint-url", kinesis_endpoint, "--region", "us-east-1",
        cwd=tmp_path,
    )  # fmt: skip
    assert process.stdin is not None
    process.stdin.write(b"\n".join(_lines(100)) + b"\n")
    process.stdin.flush()  # stdin stays open: the command waits for more lines
    shard = (await kinesis.list_shards(stream))[0].shard_id
    iterator = await kinesis.get_shard_iterator(stream, shard, "TRIM_HORIZON")
    seen: list[Record] = []

    async def all_written() -> bool:
        nonlocal iterator
        batch = await kinesis.get_records(iterator)
        iterator = batch.next_shard_iterator or iterator
        seen.extend(deaggregate(batch.records))
        return len(seen) >= 100

    try:
        await wait_until_async(all_written, timeout=30, what="the 100 lines in the stream")
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr_bytes = await asyncio.to_thread(process.communicate, None, 60)
    stderr = stderr_bytes.decode()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM: stopped reading after line 100" in stderr
    assert "Traceback" not in stderr
    assert "Exception" not in stderr
    assert "never awaited" not in stderr
    assert f"produced 100 records to {stream}" in stderr
    collect = await _read_back(kinesis, stream, 100)
    assert Counter(r.data for r in collect.records) == Counter(_lines(100))


async def test_records_failing_after_retries_are_reported_and_exit_3(tmp_path: Path) -> None:
    async with FakePutEndpoint({"orders": 2}) as endpoint:
        endpoint.fail_next_entries(1, code="KMSAccessDeniedException")  # not retriable: line 1 fails
        code, stderr = await _run(
            "--stream", "orders", "--no-aggregate", "--endpoint-url", endpoint.url, "--region", "us-east-1",
            cwd=tmp_path, stdin=b"\n".join(_lines(20)) + b"\n",
        )  # fmt: skip
        stored = sorted(r.data for r in endpoint.stored("orders"))
    assert code == 3, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("kinesis-butler: error:")]
    assert len(errors) == 1
    assert errors[0].startswith("kinesis-butler: error: line 1: not written: ")
    assert "KMSAccessDeniedException" in errors[0]
    assert "produced 19 records to orders" in stderr
    assert "; 1 failed; 0 skipped" in stderr
    assert stored == sorted(_lines(20)[1:])
