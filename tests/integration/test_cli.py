"""The kinesis-butler command: clean shutdown on SIGTERM, and one clear line for each user error."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kinesis_butler.aws import KinesisClient
from kinesis_butler.testing.emulator import free_port
from tests.helpers import wait_until_sync
from tests.integration.conftest import StreamFactory, put_numbers

pytestmark = pytest.mark.integration

UNSET = "\0unset"  # an env value that means: remove the variable

PROCESSOR = textwrap.dedent(
    """
    import json, os

    def handle(records):
        with open(os.environ["OUT"], "a") as out:
            for record in records:
                out.write(f"{record.shard_id} {record.sequence_number} {json.loads(record.data)['n']}\\n")
    """
)


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    merged = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "kinesis_butler", *args],
        cwd=cwd,
        env={name: value for name, value in merged.items() if value != UNSET},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_consume_checkpoints_and_exits_cleanly_on_sigterm(
    kinesis: KinesisClient, kinesis_endpoint: str, new_stream: StreamFactory, tmp_path: Path
) -> None:
    stream = await new_stream(2)
    await put_numbers(kinesis, stream, 0, 300)
    (tmp_path / "myproc.py").write_text(PROCESSOR)
    out = tmp_path / "out.txt"
    process = _cli(
        "consume", "--stream", stream, "--app", "cli-app", "--processor", "myproc:handle",
        "--store", "sqlite:///leases.db", "--endpoint-url", kinesis_endpoint, "--region", "us-east-1",
        "--quiet", cwd=tmp_path, env={"OUT": str(out)},
    )  # fmt: skip
    try:
        await asyncio.to_thread(
            wait_until_sync,
            lambda: out.exists() and len(out.read_text().splitlines()) >= 300,
            timeout=60,
            what="300 records processed by the CLI",
        )
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=60)
    assert process.returncode == 0, stderr
    assert "stopped cleanly" in stderr
    assert "Traceback" not in stderr
    lines = [line.split() for line in out.read_text().splitlines()]
    assert sorted(int(n) for _, _, n in lines) == list(range(300))
    last = {shard: seq for shard, seq, _ in lines}
    with sqlite3.connect(tmp_path / "leases.db") as db:
        rows = dict(db.execute("SELECT lease_key, checkpoint FROM leases WHERE app = 'cli-app'").fetchall())
        owners = {owner for (owner,) in db.execute("SELECT lease_owner FROM leases")}
    db.close()
    assert rows == last
    assert owners == {None}


PER_RECORD = textwrap.dedent(
    """
    import asyncio, json, os

    async def handle(record):
        await asyncio.sleep(0.001)
        with open(os.environ["OUT"], "a") as out:
            n = json.loads(record.data)["n"]
            out.write(f"{record.shard_id} {record.sequence_number} {record.partition_key} {n}\\n")
    """
)


@pytest.mark.parametrize("fanout", [False, True], ids=["polling", "fanout"])
async def test_consume_per_record_keeps_key_order_and_checkpoints_the_last_records(
    kinesis: KinesisClient, kinesis_endpoint: str, new_stream: StreamFactory, tmp_path: Path, fanout: bool
) -> None:
    stream = await new_stream(2)
    await put_numbers(kinesis, stream, 0, 300, keys=40)
    (tmp_path / "perrecord.py").write_text(PER_RECORD)
    out = tmp_path / "out.txt"
    process = _cli(
        *(["--log-level", "INFO"] if fanout else []),
        "consume", "--stream", stream, "--app", "cli-app", "--processor", "perrecord:handle",
        "--per-record", "--concurrency", "8", "--store", "sqlite:///leases.db",
        "--endpoint-url", kinesis_endpoint, "--region", "us-east-1", "--quiet",
        *(["--fanout", "--fanout-consumer", f"c-{stream}"] if fanout else []),
        cwd=tmp_path, env={"OUT": str(out)},
    )  # fmt: skip
    try:
        await asyncio.to_thread(
            wait_until_sync,
            lambda: out.exists() and len(out.read_text().splitlines()) >= 300,
            timeout=60,
            what="300 records handled one by one",
        )
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=60)
    assert process.returncode == 0, stderr
    if fanout:
        assert "reading through enhanced fan-out consumer" in stderr
        assert "polling instead" not in stderr
    lines = [line.split() for line in out.read_text().splitlines()]
    assert sorted(int(n) for *_, n in lines) == list(range(300))
    by_key: dict[str, list[int]] = {}
    for _, _, key, n in lines:
        by_key.setdefault(key, []).append(int(n))
    assert all(ns == sorted(ns) for ns in by_key.values())
    last = {shard: max((seq for s, seq, *_ in lines if s == shard), key=int) for shard, *_ in lines}
    with sqlite3.connect(tmp_path / "leases.db") as db:
        rows = dict(db.execute("SELECT lease_key, checkpoint FROM leases WHERE app = 'cli-app'").fetchall())
    db.close()
    assert rows == last


NO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": UNSET,
    "AWS_SECRET_ACCESS_KEY": UNSET,
    "AWS_SESSION_TOKEN": UNSET,
    "AWS_PROFILE": UNSET,
    "AWS_CONFIG_FILE": "/nonexistent/config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": UNSET,
    "AWS_CONTAINER_CREDENTIALS_FULL_URI": UNSET,
    "AWS_WEB_IDENTITY_TOKEN_FILE": UNSET,
}


@pytest.mark.parametrize(
    ("case", "overrides", "env", "expected"),
    [
        ("unknown stream", {"--stream": "no-such-stream"}, {}, "stream 'no-such-stream' does not exist"),
        ("bad processor", {"--processor": "nosuchmodule:handle"}, {}, "cannot import module 'nosuchmodule'"),
        ("malformed processor", {"--processor": "nocolon"}, {}, "expected 'package.module:function'"),
        ("concurrency alone", {"--concurrency": "4"}, {}, "--concurrency needs --per-record"),
        ("bad store url", {"--store": "mysql://u:hunter2@db/x"}, {}, "lease store URL"),
        ("bad start", {"--start-at": "yesterday"}, {}, "invalid start position 'yesterday'"),
        ("shard start no =", {"--start-at-shard": "shardId-0"}, {}, "expected SHARD=POSITION"),
        (
            "shard start bad seq",
            {"--start-at-shard": "shardId-0=after_sequence_number:x"},
            {},
            "'x' is not a sequence number",
        ),
        ("stream-wide sequence", {"--start-at": "at_sequence_number:1"}, {}, "per shard"),
        ("bad quota share", {"--read-quota-share": "2"}, {}, "read_quota_share must be within (0, 1]"),
        ("no credentials", {}, NO_CREDENTIALS, "credentials"),
        ("unreachable endpoint", {"--endpoint-url": "http://127.0.0.1:{free}"}, {}, "127.0.0.1"),
    ],
)
def test_user_errors_print_one_clear_line_and_exit_2(
    case: str,
    overrides: dict[str, str],
    env: dict[str, str],
    expected: str,
    kinesis_endpoint: str,
    tmp_path: Path,
) -> None:
    (tmp_path / "myproc.py").write_text(PROCESSOR)
    args = {
        "--stream": "any-stream",
        "--app": "app",
        "--processor": "myproc:handle",
        "--store": "sqlite:///leases.db",
        "--endpoint-url": kinesis_endpoint,
        "--region": "us-east-1",
    }
    args.update({k: v.replace("{free}", str(free_port())) for k, v in overrides.items()})
    argv = ["consume", *[item for pair in args.items() for item in pair], "--quiet"]
    process = _cli(*argv, cwd=tmp_path, env={**env, "OUT": str(tmp_path / "out")})
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, f"{case}: {stderr}"
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("kinesis-butler: error:")]
    assert len(error_lines) == 1, stderr
    assert expected in error_lines[0]
    assert "hunter2" not in stderr  # secrets never appear in errors


def test_the_demo_resumes_from_its_checkpoints_on_a_second_run(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    argv = ["demo", "--records", "400", "--dir", str(demo_dir)]
    first = subprocess.run(
        [sys.executable, "-m", "kinesis_butler", *argv],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "processed 400 of 400 records" in first.stdout
    second = subprocess.run(
        [sys.executable, "-m", "kinesis_butler", *argv],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resumed from the checkpoints: read only the 400 new records" in second.stdout
    assert "processed 400 of 400 records" in second.stdout


async def test_local_runs_the_emulator_until_sigterm_and_creates_streams(tmp_path: Path) -> None:
    port = free_port()
    process = _cli("local", "--port", str(port), "--create-stream", "local-s:2", cwd=tmp_path)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        line = await asyncio.to_thread(process.stdout.readline)  # type: ignore[union-attr]
        assert endpoint in line
        created = await asyncio.to_thread(process.stdout.readline)  # type: ignore[union-attr]
        assert "created stream local-s (2 shards)" in created
        async with KinesisClient(endpoint_url=endpoint, region="us-east-1") as client:
            summary = await client.describe_stream_summary("local-s")
        assert summary.open_shard_count == 2
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.communicate, timeout=30)
    assert process.returncode == 0
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the emulator outlived the command"


@pytest.mark.parametrize("kind", ["foreign sqlite table", "unreachable postgres", "unreachable redis"])
def test_store_problems_are_one_clear_line(kind: str, kinesis_endpoint: str, tmp_path: Path) -> None:
    (tmp_path / "myproc.py").write_text(PROCESSOR)
    if kind == "foreign sqlite table":
        with sqlite3.connect(tmp_path / "other.db") as db:
            db.execute("CREATE TABLE leases (id INTEGER PRIMARY KEY, holder TEXT)")
        db.close()
        store, expected = "sqlite:///other.db", "not a kinesis-butler lease table"
    elif kind == "unreachable postgres":
        store, expected = f"postgresql://kb:hunter2@127.0.0.1:{free_port()}/x", "127.0.0.1"
    else:
        store, expected = f"redis://:hunter2@127.0.0.1:{free_port()}/0", "127.0.0.1"

    async def make_stream() -> str:
        async with KinesisClient(endpoint_url=kinesis_endpoint, region="us-east-1") as client:
            name = f"kb-store-{abs(hash(kind)) % 10**8}-{free_port()}"
            await client.create_stream(name, 1)
            await client.wait_for_active(name)
            return name

    stream = asyncio.run(make_stream())
    argv = [
        "consume", "--stream", stream, "--app", "app", "--processor", "myproc:handle", "--store", store,
        "--endpoint-url", kinesis_endpoint, "--region", "us-east-1", "--quiet",
    ]  # fmt: skip
    process = _cli(*argv, cwd=tmp_path, env={"OUT": str(tmp_path / "out")})
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("kinesis-butler: error:")]
    assert expected in line
    assert "hunter2" not in stderr
