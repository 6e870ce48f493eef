"""A fake Kinesis endpoint for the write path, with scripted failures.

A real local HTTP/1.1 server (aiohttp) speaking the Kinesis JSON protocol
(``application/x-amz-json-1.1``, ``X-Amz-Target: Kinesis_20131202.<Operation>``) for PutRecords,
PutRecord, ListShards and DescribeStreamSummary. Each stream has shards splitting the 128-bit hash
key space evenly, as CreateStream does; a record goes to the shard whose range holds the MD5 of its
partition key (or its explicit hash key) and gets the next sequence number of that shard
(increasing, as decimal strings). Signatures are not checked.

Failures the test scripts:

* :meth:`FakePutEndpoint.fail_next_entries` - the next ``n`` PutRecords entries (or PutRecord
  calls) fail with an entry error code; nothing of them is stored.
* :meth:`FakePutEndpoint.set_failure_rate` - each entry fails with a probability, from a seeded
  random generator (reproducible).
* :meth:`FakePutEndpoint.fail_next_calls` - whole calls (of PutRecords, by default) answer an
  error status (500 ``InternalFailure``; or 400 ``ProvisionedThroughputExceededException`` to
  throttle).

Example::

    async with FakePutEndpoint(streams={"orders": 4}) as server:
        server.set_failure_rate(0.3, seed=7)
        server.fail_next_calls(2)
        async with AsyncProducer("orders", endpoint_url=server.url, region="us-east-1") as producer:
            ...
        assert len(server.stored("orders")) == n
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import random
import socket
from collections import Counter, deque
from types import TracebackType
from typing import Any, Self

from aiohttp import web

__all__ = ["FakePutEndpoint", "StoredRecord"]

_JSON = "application/x-amz-json-1.1"
_MAX_HASH = 2**128 - 1
_THROTTLE = "ProvisionedThroughputExceededException"


@dataclasses.dataclass(frozen=True)
class StoredRecord:
    """A record the endpoint accepted, in the order its shard stored it."""

    stream: str
    shard_id: str
    sequence_number: str
    partition_key: str
    data: bytes
    explicit_hash_key: str | None = None


@dataclasses.dataclass
class _Shard:
    shard_id: str
    start: int
    end: int
    records: list[StoredRecord] = dataclasses.field(default_factory=list)


class _Reply(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class FakePutEndpoint:
    """A local Kinesis write endpoint. Use as ``async with``; :attr:`url` is the endpoint URL.

    Args:
        streams: stream name -> shard count, created ACTIVE at once.
        host: the address to listen on.
    """

    def __init__(self, streams: dict[str, int] | None = None, *, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.calls: Counter[str] = Counter()  # operation -> calls answered (errors included)
        self.failed_entries = 0  # entries answered with an error code
        self._streams: dict[str, list[_Shard]] = {}
        self._sequence = 0
        self._entry_faults: deque[str] = deque()
        self._call_faults: deque[tuple[int, str, str | None]] = deque()
        self._rate = 0.0
        self._rate_code = _THROTTLE
        self._random = random.Random(0)
        self._runner: web.AppRunner | None = None
        for name, count in (streams or {}).items():
            self.add_stream(name, count)

    # -- scripting ----------------------------------------------------------------------------

    def add_stream(self, name: str, shards: int = 1) -> None:
        """Create an ACTIVE stream whose shards split the hash key space evenly."""
        if shards < 1:
            raise ValueError("a stream needs at least one shard")
        step = (_MAX_HASH + 1) // shards
        self._streams[name] = [
            _Shard(f"shardId-{i:012d}", i * step, _MAX_HASH if i == shards - 1 else (i + 1) * step - 1)
            for i in range(shards)
        ]

    def fail_next_entries(self, n: int, code: str = _THROTTLE) -> None:
        """The next ``n`` entries (PutRecords entries or PutRecord calls) fail with ``code``."""
        self._entry_faults.extend([code] * n)

    def set_failure_rate(self, rate: float, *, seed: int = 0, code: str = _THROTTLE) -> None:
        """Each later entry fails with ``code`` with probability ``rate`` (seeded; 0 turns it off)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be within 0..1, got {rate}")
        self._rate, self._rate_code, self._random = rate, code, random.Random(seed)

    def fail_next_calls(
        self,
        n: int,
        *,
        status: int = 500,
        code: str = "InternalFailure",
        operation: str | None = "PutRecords",
    ) -> None:
        """The next ``n`` calls of ``operation`` (None: of any) answer ``status`` with ``code``
        and store nothing. ``status=400, code="ProvisionedThroughputExceededException"`` throttles.
        """
        self._call_faults.extend([(status, code, operation)] * n)

    # -- inspection ---------------------------------------------------------------------------

    def stored(self, stream: str, shard_id: str | None = None) -> list[StoredRecord]:
        """The accepted records of a stream (or one shard), each shard in sequence order."""
        return [r for s in self._streams[stream] if shard_id in (None, s.shard_id) for r in s.records]

    @property
    def url(self) -> str:
        """The endpoint URL to give a client (``http://host:port``)."""
        if self._runner is None:
            raise RuntimeError("the endpoint is not started")
        return f"http://{self.host}:{self.port}"

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> Self:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- the protocol -------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        operation = request.headers.get("X-Amz-Target", "").rpartition(".")[2]
        self.calls[operation] += 1
        try:
            answer = self._dispatch(operation, json.loads(await request.read() or b"{}"))
        except _Reply as reply:
            error = {"__type": reply.code, "message": reply.message}
            return web.Response(status=reply.status, body=json.dumps(error).encode(), content_type=_JSON)
        return web.Response(body=json.dumps(answer).encode(), content_type=_JSON)

    def _dispatch(self, operation: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._call_faults and self._call_faults[0][2] in (None, operation):
            status, code, _ = self._call_faults.popleft()
            raise _Reply(status, code, f"injected {code}")
        handler = {
            "PutRecords": self._put_records,
            "PutRecord": self._put_record,
            "ListShards": self._list_shards,
            "DescribeStreamSummary": self._describe,
        }.get(operation)
        if handler is None:
            raise _Reply(400, "UnknownOperationException", f"{operation!r} is not supported here")
        return handler(body)

    def _shards(self, body: dict[str, Any]) -> tuple[str, list[_Shard]]:
        name = str(body.get("StreamName") or str(body.get("StreamARN", "")).rpartition("/")[2])
        if name not in self._streams:
            raise _Reply(400, "ResourceNotFoundException", f"Stream {name} under account 0 not found.")
        return name, self._streams[name]

    def _entry_fault(self) -> str | None:
        if self._entry_faults:
            return self._entry_faults.popleft()
        if self._rate and self._random.random() < self._rate:
            return self._rate_code
        return None

    def _store(self, stream: str, shards: list[_Shard], entry: dict[str, Any]) -> dict[str, str]:
        key = str(entry.get("PartitionKey", ""))
        if not 1 <= len(key) <= 256:
            raise _Reply(400, "ValidationException", "PartitionKey must be 1..256 characters")
        explicit = entry.get("ExplicitHashKey")
        hash_key = int(explicit) if explicit else int.from_bytes(hashlib.md5(key.encode()).digest(), "big")  # noqa: S324 - Kinesis's hash
        code = self._entry_fault()
        if code is not None:
            self.failed_entries += 1
            return {"ErrorCode": code, "ErrorMessage": f"injected {code}"}
        shard = next(s for s in shards if s.start <= hash_key <= s.end)
        self._sequence += 1
        sequence = f"{49_000_000_000_000_000_000 + self._sequence:d}"
        data = base64.b64decode(entry.get("Data", ""))
        shard.records.append(StoredRecord(stream, shard.shard_id, sequence, key, data, explicit))
        return {"ShardId": shard.shard_id, "SequenceNumber": sequence}

    def _put_records(self, body: dict[str, Any]) -> dict[str, Any]:
        stream, shards = self._shards(body)
        entries = body.get("Records") or []
        if not 1 <= len(entries) <= 500:
            raise _Reply(400, "ValidationException", "Records must hold 1..500 entries")
        results = [self._store(stream, shards, entry) for entry in entries]
        failed = sum("ErrorCode" in result for result in results)
        return {"FailedRecordCount": failed, "Records": results, "EncryptionType": "NONE"}

    def _put_record(self, body: dict[str, Any]) -> dict[str, Any]:
        stream, shards = self._shards(body)
        result = self._store(stream, shards, body)
        if "ErrorCode" in result:
            raise _Reply(400, result["ErrorCode"], result["ErrorMessage"])
        return {**result, "EncryptionType": "NONE"}

    def _list_shards(self, body: dict[str, Any]) -> dict[str, Any]:
        _, shards = self._shards(body)
        return {
            "Shards": [
                {
                    "ShardId": s.shard_id,
                    "HashKeyRange": {"StartingHashKey": str(s.start), "EndingHashKey": str(s.end)},
                    "SequenceNumberRange": {"StartingSequenceNumber": "49000000000000000000"},
                }
                for s in shards
            ]
        }

    def _describe(self, body: dict[str, Any]) -> dict[str, Any]:
        name, shards = self._shards(body)
        summary = {
            "StreamName": name,
            "StreamARN": f"arn:aws:kinesis:us-east-1:000000000000:stream/{name}",
            "StreamStatus": "ACTIVE",
            "RetentionPeriodHours": 24,
            "StreamCreationTimestamp": 0.0,
            "OpenShardCount": len(shards),
            "StreamModeDetails": {"StreamMode": "PROVISIONED"},
            "ConsumerCount": 0,
            "EncryptionType": "NONE",
        }
        return {"StreamDescriptionSummary": summary}
