"""What the fuzz harnesses and unit tests share: an independent reading of KPL aggregates with
aws-kinesis-agg's generated protobuf classes, and a short atheris run of a harness."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from aws_kinesis_agg import deaggregator, messages_pb2  # noqa: F401 - deaggregator puts config_pb2 on the path
from google.protobuf.message import DecodeError

# Spelled out, not imported: the reference stays independent of the code under test, and the
# harnesses must import kinesis_butler.retrieval.kpl only inside atheris's instrumentation.
MAGIC = b"\xf3\x89\x9a\xc2"
MAX_HASH_KEY = 2**128 - 1

Entry = tuple[bytes, str, str | None]
HERE = Path(__file__).resolve().parent


def reference(data: bytes) -> list[Entry] | None:
    """The entries in ``data``; None when it is not a well-formed aggregate."""
    """The entries ``deaggregate`` must deliver for ``data``, or None if it is a plain record."""
    body = data[4:-16]
    if (
        not data.startswith(MAGIC)
        or len(data) <= 20
        or hashlib.md5(body, usedforsecurity=False).digest() != data[-16:]
    ):
        return None
    message = messages_pb2.AggregatedRecord()
    try:
        message.ParseFromString(body)
    except DecodeError:
        return None
    keys, hash_keys = list(message.partition_key_table), list(message.explicit_hash_key_table)
    if not message.IsInitialized() or not all(isinstance(k, str) for k in keys + hash_keys):
        return None
    if not all(k.isascii() and k.isdigit() and len(k) <= 39 and int(k) <= MAX_HASH_KEY for k in hash_keys):
        return None
    entries: list[Entry] = []
    for sub in message.records:
        has_hash_key = sub.HasField("explicit_hash_key_index")
        if sub.partition_key_index >= len(keys) or (
            has_hash_key and sub.explicit_hash_key_index >= len(hash_keys)
        ):
            return None
        hash_key = hash_keys[sub.explicit_hash_key_index] if has_hash_key else None
        entries.append((sub.data, keys[sub.partition_key_index], hash_key))
    return entries


def run_harness(harness: str, cwd: Path, runs: int = 20_000) -> None:
    """Run ``tests/fuzz/<harness>`` for ``runs`` inputs; fail with its output if it finds anything."""
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed (it builds only for x86_64 CPython < 3.13)")
    completed = subprocess.run(
        [sys.executable, str(HERE / harness), f"-runs={runs}", "-seed=1"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"Done {runs} runs" in completed.stderr
