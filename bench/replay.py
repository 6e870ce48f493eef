"""A replay Kinesis endpoint for benchmarks: canned answers, served from a child process.

It answers the operations a polling consumer needs, from bodies built once at start-up:

* ``GetRecords``: the body is chosen by the iterator's *kind* (see :data:`KINDS`): 10,000 records
  of 100 B, 1,000 records of 1 KiB, or an empty batch. Records look like the service's: base64
  ``Data``, 56-digit sequence numbers, ``ApproximateArrivalTimestamp`` in the service's
  ``1.795431832505E9`` notation, a partition key. ``NextShardIterator`` is the same iterator, so a
  loop reads for ever; ``MillisBehindLatest`` is 0 for the empty kind and 86,400,000 otherwise.
* ``GetShardIterator``: the iterator of the stream's kind.
* ``DescribeStream``, ``DescribeStreamSummary``, ``ListShards``: an ``ACTIVE`` stream whose shard
  count and kind come from its name, ``replay-<kind>-<shards>`` (see :func:`stream_name`).
* ``PutRecords``: every entry written to ``shardId-000000000000`` (one result per request entry,
  counted by its ``"PartitionKey"`` member; see :func:`put_records_body`): for one-shard streams.

The HTTP/1.1 server is a minimal ``asyncio.Protocol`` (keep-alive, ``Content-Length`` bodies,
``Expect: 100-continue``), much cheaper per request than a framework, so clients wait on it as
little as possible. It runs in a child process: the benchmark measures only its own process's
CPU. The child counts what it served in shared memory (:meth:`ReplayServer.served`), which lets a
benchmark count the polls of a client it cannot instrument.

Example:
    >>> with ReplayServer() as server:
    ...     client = KinesisClient(endpoint_url=server.endpoint, ...)
    ...     it = iterator_for("100b")
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import mmap
import os
import random
import re
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "KINDS",
    "Kind",
    "ReplayServer",
    "build_bodies",
    "get_records_body",
    "iterator_for",
    "put_records_body",
    "stream_name",
]


@dataclass(frozen=True)
class Kind:
    """One canned GetRecords answer: ``records`` records of ``size`` payload bytes each."""

    name: str
    records: int
    size: int


#: The canned answers, by name.
KINDS: Final = {
    "100b": Kind("100b", 10_000, 100),
    "1kib": Kind("1kib", 1_000, 1024),
    "empty": Kind("empty", 0, 0),
}

_OPERATIONS: Final = (
    "GetRecords",
    "GetShardIterator",
    "DescribeStream",
    "DescribeStreamSummary",
    "ListShards",
    "PutRecords",
    "other",
)
_STREAM_RE: Final = re.compile(r"replay-([a-z0-9]+)-(\d+)")
_ITERATOR_RE: Final = re.compile(rb"AAAAAAAAAAF([a-z0-9]+)Q")
_SHARD_ID_RE: Final = re.compile(rb'"ShardId"\s*:\s*"([^"]*)"')
_STREAM_NAME_RE: Final = re.compile(rb'"Stream(?:Name|ARN)"\s*:\s*"([^"]*)"')
_CREATED: Final = 1.795400000123e9
_SEQUENCE_BASE: Final = int("49590338271490256608559692538361571095921575989136588898")  # 56 digits


def stream_name(kind: str, shards: int = 1) -> str:
    """The stream whose GetRecords answers are ``kind`` and that has ``shards`` shards."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    return f"replay-{kind}-{shards}"


def iterator_for(kind: str) -> str:
    """A shard iterator (about 250 characters, like the service's) that reads ``kind``."""
    head = f"AAAAAAAAAAF{kind}Q"
    filler = base64.b64encode(random.Random(kind).randbytes(180)).decode()
    return (head + filler.replace("/", "x").replace("+", "y"))[:248]


def _number(value: float) -> str:
    # The service writes timestamps as 1.795431832505E9; keep that notation.
    mantissa, exponent = f"{value:.12E}".split("E")
    return f"{mantissa.rstrip('0').rstrip('.')}E{int(exponent)}"


def get_records_body(kind: Kind, *, records: int | None = None, seed: int = 7) -> bytes:
    """The GetRecords answer for ``kind`` (or its first ``records``), shaped as the service's."""
    rng = random.Random(seed)
    parts = []
    for i in range(kind.records if records is None else records):
        data = base64.b64encode(rng.randbytes(kind.size)).decode()
        sequence = f"{_SEQUENCE_BASE + i * 8_796_093_022_208:056d}"
        parts.append(
            f'{{"SequenceNumber":"{sequence}",'
            f'"ApproximateArrivalTimestamp":{_number(1_795_431_832.505 + i / 1000)},'
            f'"Data":"{data}","PartitionKey":"{rng.getrandbits(64):016x}-{i % 977}"}}'
        )
    behind = 0 if kind.records == 0 else 86_400_000
    return (
        f'{{"MillisBehindLatest":{behind},"NextShardIterator":"{iterator_for(kind.name)}",'
        f'"Records":[{",".join(parts)}]}}'
    ).encode()


#: With ``vary``, the record counts of the answers a kind cycles through (fractions of its count).
VARIED_SHARES: Final = (1.0, 0.55, 0.9, 0.7, 0.95, 0.6, 0.8, 0.65)


def build_bodies(*, vary: bool = False) -> dict[str, list[bytes]]:
    """Every kind's GetRecords answers: one each, or with ``vary`` one per :data:`VARIED_SHARES`
    (a real stream's answers differ in size, and so does what the allocator does with them)."""
    shares = VARIED_SHARES if vary else (1.0,)
    return {
        name: [get_records_body(kind, records=round(kind.records * share)) for share in shares]
        for name, kind in KINDS.items()
    }


# -- the canned non-GetRecords answers ---------------------------------------------------------


@functools.cache
def put_records_body(entries: int) -> bytes:
    """The PutRecords answer for ``entries`` entries, all written to shard 0 (built once per count)."""
    results = ",".join(
        f'{{"SequenceNumber":"{_SEQUENCE_BASE + i * 8_796_093_022_208:056d}",'
        '"ShardId":"shardId-000000000000"}'
        for i in range(entries)
    )
    return f'{{"FailedRecordCount":0,"Records":[{results}]}}'.encode()


def _shards(count: int) -> list[str]:
    step = (2**128) // count
    shards = []
    for index in range(count):
        start = index * step
        end = 2**128 - 1 if index == count - 1 else (index + 1) * step - 1
        shards.append(
            f'{{"ShardId":"shardId-{index:012d}",'
            f'"HashKeyRange":{{"StartingHashKey":"{start}","EndingHashKey":"{end}"}},'
            f'"SequenceNumberRange":{{"StartingSequenceNumber":"{_SEQUENCE_BASE:056d}"}}}}'
        )
    return shards


def _stream(body: bytes) -> tuple[str, int, str]:
    """(stream name, shard count, kind) of a request naming ``replay-<kind>-<shards>``."""
    match = _STREAM_NAME_RE.search(body)
    name = match.group(1).decode() if match else ""
    parsed = _STREAM_RE.search(name)
    if parsed is None or parsed.group(1) not in KINDS:
        return name, 0, ""
    return name, int(parsed.group(2)), parsed.group(1)


def _arn(name: str) -> str:
    return f"arn:aws:kinesis:us-east-1:123456789012:stream/{name}"


def _not_found(name: str) -> tuple[int, bytes]:
    return 400, (
        f'{{"__type":"ResourceNotFoundException","message":"Stream {name} under account '
        f'123456789012 not found."}}'
    ).encode()


def _get_shard_iterator(name: str, count: int, kind: str, body: bytes) -> tuple[int, bytes]:
    shard = _SHARD_ID_RE.search(body)
    index = shard.group(1).rsplit(b"-", 1)[-1] if shard else b""
    if not index.isdigit() or int(index) >= count:
        return 400, b'{"__type":"ResourceNotFoundException","message":"Shard not found."}'
    return 200, f'{{"ShardIterator":"{iterator_for(kind)}"}}'.encode()


def _list_shards(name: str, count: int, kind: str, body: bytes) -> tuple[int, bytes]:
    return 200, f'{{"Shards":[{",".join(_shards(count))}]}}'.encode()


def _describe_stream(name: str, count: int, kind: str, body: bytes) -> tuple[int, bytes]:
    return 200, (
        f'{{"StreamDescription":{{"StreamName":"{name}","StreamARN":"{_arn(name)}",'
        f'"StreamStatus":"ACTIVE","StreamModeDetails":{{"StreamMode":"PROVISIONED"}},'
        f'"Shards":[{",".join(_shards(count))}],"HasMoreShards":false,"RetentionPeriodHours":24,'
        f'"StreamCreationTimestamp":{_number(_CREATED)},"EnhancedMonitoring":[{{"ShardLevelMetrics":[]}}],'
        f'"EncryptionType":"NONE"}}}}'
    ).encode()


def _describe_stream_summary(name: str, count: int, kind: str, body: bytes) -> tuple[int, bytes]:
    return 200, (
        f'{{"StreamDescriptionSummary":{{"StreamName":"{name}","StreamARN":"{_arn(name)}",'
        f'"StreamStatus":"ACTIVE","StreamModeDetails":{{"StreamMode":"PROVISIONED"}},'
        f'"RetentionPeriodHours":24,"StreamCreationTimestamp":{_number(_CREATED)},'
        f'"EnhancedMonitoring":[{{"ShardLevelMetrics":[]}}],"EncryptionType":"NONE",'
        f'"OpenShardCount":{count},"ConsumerCount":0}}}}'
    ).encode()


_STREAM_OPERATIONS: Final[dict[str, Callable[[str, int, str, bytes], tuple[int, bytes]]]] = {
    "GetShardIterator": _get_shard_iterator,
    "ListShards": _list_shards,
    "DescribeStream": _describe_stream,
    "DescribeStreamSummary": _describe_stream_summary,
}


def answer(operation: str, body: bytes, bodies: dict[str, list[bytes]], turn: int = 0) -> tuple[int, bytes]:
    """(status, body) for one call; ``turn`` picks among a kind's answers."""
    if operation == "GetRecords":
        match = _ITERATOR_RE.search(body)
        canned = bodies.get(match.group(1).decode()) if match else None
        if canned is None:
            return 400, b'{"__type":"InvalidArgumentException","message":"Invalid ShardIterator."}'
        return 200, canned[turn % len(canned)]
    if operation == "PutRecords":  # both botocore and msgspec write the member as "PartitionKey"
        return 200, put_records_body(body.count(b'"PartitionKey"'))
    handler = _STREAM_OPERATIONS.get(operation)
    if handler is None:
        return 400, f'{{"__type":"UnknownOperationException","message":"{operation}"}}'.encode()
    name, count, kind = _stream(body)
    if not count:
        return _not_found(name)
    return handler(name, count, kind, body)


# -- the HTTP server ---------------------------------------------------------------------------

_REASONS: Final = {200: "OK", 400: "Bad Request"}


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: parse requests as they arrive, answer each in turn."""

    def __init__(self, handle: Callable[[str, bytes], tuple[int, bytes]]) -> None:
        self._handle = handle
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._continued = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        transport = self._transport
        assert transport is not None
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(self._buffer) < end + 4 + length:
                if headers.get("expect", "").lower() == "100-continue" and not self._continued:
                    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    self._continued = True
                return
            body = bytes(self._buffer[end + 4 : end + 4 + length])
            del self._buffer[: end + 4 + length]
            self._continued = False
            operation = headers.get("x-amz-target", "").rpartition(".")[2]
            status, payload = self._handle(operation, body)
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                "Content-Type: application/x-amz-json-1.1\r\n"
                f"Content-Length: {len(payload)}\r\n"
                "x-amzn-RequestId: c0ffee00-aaaa-bbbb-cccc-0123456789ab\r\n"
                "x-amz-id-2: replay\r\n"
                "\r\n"
            ).encode()
            transport.writelines((head, payload))


_SLOTS: Final = len(_OPERATIONS) + len(KINDS)


def _serve(counts_path: str, vary: bool, tls: tuple[str, str] | None) -> None:
    """The child process: build the bodies, listen, print the port, answer until terminated."""
    bodies = build_bodies(vary=vary)
    slot = {name: index for index, name in enumerate(_OPERATIONS)}
    kind_slot = {name: len(_OPERATIONS) + index for index, name in enumerate(KINDS)}
    with open(counts_path, "r+b") as file:
        shared = mmap.mmap(file.fileno(), _SLOTS * 8)
    counts = memoryview(shared).cast("q")
    context = None
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)

    def handle(operation: str, body: bytes) -> tuple[int, bytes]:
        counts[slot.get(operation, slot["other"])] += 1
        status, payload = answer(operation, body, bodies, counts[slot["GetRecords"]])
        if operation == "GetRecords" and status == 200:
            match = _ITERATOR_RE.search(body)
            if match:
                counts[kind_slot[match.group(1).decode()]] += 1
        return status, payload

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Connection(handle), "127.0.0.1", 0, backlog=1024, ssl=context
        )
        port = server.sockets[0].getsockname()[1]
        print(f"listening {port}", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class ReplayServer:
    """The replay endpoint in a child process (a fresh interpreter); a context manager.

    Attributes:
        endpoint: ``http://127.0.0.1:<port>`` (``https://`` with ``tls``), once started.
        ca_file: with ``tls``, the PEM file of the server's self-signed certificate: trust it
            (``SSL_CERT_FILE`` for aiohttp, ``AWS_CA_BUNDLE`` for botocore) before creating clients.
    """

    def __init__(self, *, vary: bool = False, tls: bool = False) -> None:
        """Args:
        vary: cycle each kind's GetRecords answers through :data:`VARIED_SHARES` of its
            record count instead of answering the same body every time.
        tls: serve HTTPS (TLS 1.3 with a throwaway certificate for 127.0.0.1), as AWS does.
        """
        self.endpoint = ""
        self._vary = vary
        self._process: subprocess.Popen[bytes] | None = None
        self._counts_file = tempfile.NamedTemporaryFile(prefix="replay-counts-")  # noqa: SIM115
        self._counts_file.write(bytes(_SLOTS * 8))
        self._counts_file.flush()
        self._shared = mmap.mmap(self._counts_file.fileno(), _SLOTS * 8)
        self._counts = memoryview(self._shared).cast("q")
        self._tls_dir = tempfile.TemporaryDirectory(prefix="replay-tls-") if tls else None
        self.ca_file = ""
        if self._tls_dir is not None:
            self.ca_file = os.path.join(self._tls_dir.name, "cert.pem")
            subprocess.run(
                [
                    "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", os.path.join(self._tls_dir.name, "key.pem"), "-out", self.ca_file,
                ],
                check=True,
                capture_output=True,
            )  # fmt: skip

    def start(self) -> ReplayServer:
        command = [sys.executable, os.path.abspath(__file__), self._counts_file.name]
        if self._vary:
            command.append("--vary")
        if self._tls_dir is not None:
            command += ["--tls", self.ca_file, os.path.join(self._tls_dir.name, "key.pem")]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE)
        assert self._process.stdout is not None
        line = self._process.stdout.readline().decode()
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"the replay server did not start (it said {line!r})")
        scheme = "https" if self._tls_dir is not None else "http"
        self.endpoint = f"{scheme}://127.0.0.1:{int(line.split()[1])}"
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                process.wait(10)
            if process.stdout is not None:
                process.stdout.close()
        if self._tls_dir is not None:
            self._tls_dir.cleanup()

    def __enter__(self) -> ReplayServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def served(self, what: str = "GetRecords") -> int:
        """How many calls of an operation (or GetRecords answers of a kind) were served so far."""
        if what in KINDS:
            return int(self._counts[len(_OPERATIONS) + list(KINDS).index(what)])
        return int(self._counts[_OPERATIONS.index(what)])


if __name__ == "__main__":
    _cli = argparse.ArgumentParser(description="the replay endpoint's child process")
    _cli.add_argument("counts")
    _cli.add_argument("--vary", action="store_true")
    _cli.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    _args = _cli.parse_args()
    _serve(_args.counts, _args.vary, tuple(_args.tls) if _args.tls else None)
