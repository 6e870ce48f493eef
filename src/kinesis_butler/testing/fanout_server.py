"""A fake enhanced fan-out server, for what the Kinesis emulator cannot do.

A real local server, like AWS on :attr:`https_url` (TLS with a self-signed certificate made at
start, trust :attr:`ca_pem`; ALPN ``h2`` and ``http/1.1``) and like kinesis-local on
:attr:`http_url` (HTTP/1.1, and h2c with prior knowledge). It answers RegisterStreamConsumer,
DescribeStreamConsumer, ListStreamConsumers, DeregisterStreamConsumer and SubscribeToShard from an
in-memory model the test scripts: records per shard, shards that end (ChildShards), duplicate
subscriptions within 5 s (ResourceInUse), throttling, and per-subscription :class:`Fault` values
(an exception frame, a truncated or corrupt stream, an early end, RST_STREAM, GOAWAY, a killed
connection, a stall). Signatures are not checked.

Example::

    async with FakeFanOutServer() as server:
        arn = server.add_stream("orders", shards=2)
        server.put("orders", "shardId-000000000000", b"hello")
        server.faults.append(Script(Fault.RESET, after_events=1))
        client = KinesisClient(endpoint_url=server.https_url, ...,
                               streaming_options=StreamingOptions(ca_data=server.ca_pem))
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Any, Self

import msgspec
from aiohttp import web

from kinesis_butler.aws.eventstream import encode_message
from kinesis_butler.aws.kinesis_shapes import ChildShard, HashKeyRange
from kinesis_butler.models import Record
from kinesis_butler.testing._h2_server import (
    Action,
    H2Reply,
    H2ServerProtocol,
    ProtocolSwitch,
    tls_server_context,
)

__all__ = ["FakeFanOutServer", "Fault", "Script", "Subscription"]

_EVENT_STREAM = "application/vnd.amazon.eventstream"
_JSON = "application/x-amz-json-1.1"
_MAX_HASH = 2**128 - 1


class Fault(enum.Enum):
    """What a scripted subscription does after its events."""

    EXCEPTION = "exception"  # an exception frame (Script.exception_type), then the end
    TRUNCATE = "truncate"  # half a frame, then a clean end of the body
    CORRUPT = "corrupt"  # a frame with a wrong CRC
    END = "end"  # a clean early end (resubscribe from the continuation)
    RESET = "reset"  # RST_STREAM (HTTP/1.1: the connection is dropped)
    GOAWAY = "goaway"  # GOAWAY, then the connection closes (HTTP/1.1: dropped)
    KILL = "kill"  # the connection is dropped without a word
    STALL = "stall"  # nothing more is sent; the stream stays open


@dataclasses.dataclass(frozen=True)
class Script:
    """The next subscription sends ``after_events`` events, then does ``fault``."""

    fault: Fault
    after_events: int = 0
    exception_type: str = "InternalFailureException"


@dataclasses.dataclass
class Subscription:
    """A SubscribeToShard call the server accepted (for assertions)."""

    consumer_arn: str
    shard_id: str
    position: dict[str, Any]
    protocol: str
    script: Script | None = None
    generation: int = 0  # how many subscriptions to this consumer and shard came before
    events_sent: int = 0


@dataclasses.dataclass
class _Shard:
    base: int  # the sequence number before the first record
    records: list[Record] = dataclasses.field(default_factory=list)
    children: list[ChildShard] | None = None  # set once the shard is closed


def _listen() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


class FakeFanOutServer:
    """The scriptable fan-out server. Attributes below may be changed while it runs.

    Attributes:
        lifetime: seconds a subscription lasts before the server ends it (AWS: 300).
        heartbeat: seconds between events while a shard is idle (AWS: about 5).
        batch_size: records per event at most.
        resubscribe_interval: a new subscription to the same consumer and shard this soon after
            the previous one gets ResourceInUse (AWS: 5 s); judged on :attr:`clock`.
        throttle_next: how many of the next SubscribeToShard calls get LimitExceededException.
        faults: scripts for the next subscriptions, taken one per subscription.
        activate_after: DescribeStreamConsumer calls until a new consumer is ACTIVE.
        send_initial_response: open each subscription with an ``initial-response`` event (AWS does).
        subscriptions: every accepted SubscribeToShard call, in order.
        h2_connections: HTTP/2 connections accepted so far.
    """

    def __init__(self, *, max_concurrent_streams: int = 100, offer_h2: bool = True) -> None:
        """Create the server (ports are bound now, served from :meth:`start`).

        Args:
            max_concurrent_streams: the HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS it announces.
            offer_h2: offer ``h2`` by ALPN on the TLS port (plain-text h2c is always served).
        """
        self.lifetime = 300.0
        self.heartbeat = 0.05
        self.batch_size = 100
        self.resubscribe_interval = 5.0
        self.throttle_next = 0
        self.faults: deque[Script] = deque()
        self.activate_after = 1
        self.send_initial_response = True
        self.clock: Callable[[], float] = time.monotonic
        self.subscriptions: list[Subscription] = []
        self.h2_connections = 0
        self._max_streams = max_concurrent_streams
        self._streams: dict[str, dict[str, _Shard]] = {}
        self._consumers: dict[str, dict[str, Any]] = {}
        self._describes: dict[str, int] = {}
        self._last_subscribe: dict[tuple[str, str], tuple[float, int]] = {}
        self._changed = asyncio.Event()
        self._protocols: set[H2ServerProtocol] = set()
        self._runner: web.AppRunner | None = None
        self._servers: list[asyncio.Server] = []
        self._tls, self.ca_pem = tls_server_context(["h2", "http/1.1"] if offer_h2 else ["http/1.1"])
        self._plain_sock, self._tls_sock = _listen(), _listen()
        self.http_url = f"http://127.0.0.1:{self._plain_sock.getsockname()[1]}"
        self.https_url = f"https://127.0.0.1:{self._tls_sock.getsockname()[1]}"

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> Self:
        app = web.Application()
        app.router.add_post("/", self._aiohttp_handler)
        # Cancel handlers whose client left (a stalled stream), and do not wait long for the rest.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        http1 = self._runner.server
        assert http1 is not None  # noqa: S101 - set by setup()
        loop = asyncio.get_running_loop()
        for sock, tls in ((self._plain_sock, None), (self._tls_sock, self._tls)):
            switch = functools.partial(ProtocolSwitch, self._h2_protocol, http1)
            self._servers.append(await loop.create_server(switch, sock=sock, ssl=tls))
        return self

    async def aclose(self) -> None:
        """Stop, dropping every connection (a killed server, for clients mid-stream)."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for protocol in list(self._protocols):
            await protocol.abort()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for server in servers:
            await server.wait_closed()

    def _h2_protocol(self) -> H2ServerProtocol:
        self.h2_connections += 1
        return H2ServerProtocol(self._h2_handler, self._protocols, self._max_streams)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the model ------------------------------------------------------------------------------

    @staticmethod
    def stream_arn(name: str) -> str:
        return f"arn:aws:kinesis:us-east-1:123456789012:stream/{name}"

    def add_stream(self, name: str, shards: int = 1) -> str:
        """Create a stream with ``shards`` open shards; return its ARN."""
        self._streams[name] = {f"shardId-{i:012d}": _Shard(base=(i + 1) * 10**20) for i in range(shards)}
        return self.stream_arn(name)

    def _shard(self, stream: str, shard_id: str) -> _Shard:
        return self._streams[stream.rsplit("/", 1)[-1]][shard_id]

    def put(self, stream: str, shard_id: str, data: bytes, partition_key: str = "pk") -> str:
        """Append a record to a shard; return its sequence number."""
        shard = self._shard(stream, shard_id)
        sequence = str(shard.base + len(shard.records) + 1)
        shard.records.append(Record(data, partition_key, sequence, time.time()))
        self._notify()
        return sequence

    def close_shard(self, stream: str, shard_id: str, children: list[str]) -> None:
        """Close a shard: subscriptions deliver its records, then a last event with ChildShards."""
        shard = self._shard(stream, shard_id)
        key_range = HashKeyRange("0", str(_MAX_HASH))
        shard.children = [ChildShard(child, [shard_id], key_range) for child in children]
        for child in children:
            self._streams[stream.rsplit("/", 1)[-1]][child] = _Shard(base=shard.base + 10**19)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- operations -----------------------------------------------------------------------------

    async def handle(self, target: str, body: bytes, protocol: str) -> H2Reply:
        try:
            request: dict[str, Any] = msgspec.json.decode(body) if body else {}
        except msgspec.DecodeError:
            return _error("SerializationException", "the body is not JSON")
        operation = target.rsplit(".", 1)[-1]
        handler = getattr(self, f"_op_{operation}", None)
        if handler is None:
            return _error("UnknownOperationException", f"{operation} is not faked here")
        try:
            reply: H2Reply = handler(request, protocol)
        except (KeyError, StopIteration) as exc:
            return _error("ResourceNotFoundException", f"{exc.args[0] if exc.args else 'consumer'} not found")
        reply.headers.append(("x-amzn-requestid", str(uuid.uuid4())))
        return reply

    async def _h2_handler(self, headers: dict[str, str], body: bytes) -> H2Reply:
        return await self.handle(headers.get("x-amz-target", ""), body, "h2")

    def _consumer(self, request: dict[str, Any]) -> dict[str, Any]:
        arn = request.get("ConsumerARN") or next(
            arn
            for arn, c in self._consumers.items()
            if c["StreamARN"] == request.get("StreamARN") and c["ConsumerName"] == request.get("ConsumerName")
        )
        return self._consumers[arn]

    def _op_RegisterStreamConsumer(self, request: dict[str, Any], _: str) -> H2Reply:
        stream_arn, name = request["StreamARN"], request["ConsumerName"]
        self._streams[stream_arn.rsplit("/", 1)[-1]]
        if any(c["StreamARN"] == stream_arn and c["ConsumerName"] == name for c in self._consumers.values()):
            return _error("ResourceInUseException", f"consumer {name} exists")
        created = time.time()
        arn = f"{stream_arn}/consumer/{name}:{int(created)}"
        consumer = {"ConsumerName": name, "ConsumerARN": arn, "ConsumerStatus": "CREATING"}
        self._consumers[arn] = {**consumer, "ConsumerCreationTimestamp": created, "StreamARN": stream_arn}
        self._describes[arn] = 0
        return _ok({"Consumer": {**consumer, "ConsumerCreationTimestamp": created}})

    def _op_DescribeStreamConsumer(self, request: dict[str, Any], _: str) -> H2Reply:
        consumer = self._consumer(request)
        self._describes[consumer["ConsumerARN"]] += 1
        if self._describes[consumer["ConsumerARN"]] >= self.activate_after:
            consumer["ConsumerStatus"] = "ACTIVE"
        return _ok({"ConsumerDescription": consumer})

    def _op_ListStreamConsumers(self, request: dict[str, Any], _: str) -> H2Reply:
        self._streams[request["StreamARN"].rsplit("/", 1)[-1]]
        mine = [c for c in self._consumers.values() if c["StreamARN"] == request["StreamARN"]]
        start, size = int(request.get("NextToken") or 0), int(request.get("MaxResults") or 100)
        page = [{k: v for k, v in c.items() if k != "StreamARN"} for c in mine[start : start + size]]
        token = str(start + size) if start + size < len(mine) else None
        return _ok({"Consumers": page, "NextToken": token})

    def _op_DeregisterStreamConsumer(self, request: dict[str, Any], _: str) -> H2Reply:
        del self._consumers[self._consumer(request)["ConsumerARN"]]
        return _ok({})

    def _op_SubscribeToShard(self, request: dict[str, Any], protocol: str) -> H2Reply:
        consumer = self._consumers[request["ConsumerARN"]]
        shard_id, position = request["ShardId"], request["StartingPosition"]
        shard = self._shard(consumer["StreamARN"], shard_id)
        if consumer["ConsumerStatus"] != "ACTIVE":
            return _error("ResourceInUseException", "the consumer is not ACTIVE")
        if self.throttle_next > 0:
            self.throttle_next -= 1
            return _error("LimitExceededException", "SubscribeToShard rate exceeded")
        key, now = (consumer["ConsumerARN"], shard_id), self.clock()
        last = self._last_subscribe.get(key)
        if last is not None and now - last[0] < self.resubscribe_interval:
            return _error("ResourceInUseException", f"another subscription to {shard_id} is active")
        script = self.faults.popleft() if self.faults else None
        sub = Subscription(*key, position, protocol, script, (last[1] + 1) if last else 0)
        self._last_subscribe[key] = (now, sub.generation)
        self.subscriptions.append(sub)
        events = self._events(shard, _start_index(shard, position), sub)
        return H2Reply(headers=[("content-type", _EVENT_STREAM)], parts=events)

    async def _events(
        self, shard: _Shard, index: int, sub: Subscription
    ) -> AsyncGenerator[bytes | Action, None]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lifetime
        if self.send_initial_response:
            yield _event("initial-response", b"{}")
        while loop.time() < deadline:
            if self._last_subscribe[sub.consumer_arn, sub.shard_id][1] != sub.generation:
                yield _exception("ResourceInUseException", "another subscription took over")
                return
            if sub.script is not None and sub.events_sent >= sub.script.after_events:
                async for part in _fault(sub.script):
                    yield part
                return
            batch = shard.records[index : index + self.batch_size]
            if not batch and shard.children is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(self.heartbeat, deadline - loop.time()))
                batch = shard.records[index : index + self.batch_size]
            index += len(batch)
            at_end = shard.children is not None and index >= len(shard.records)
            last = shard.records[index - 1] if index else None
            behind = (
                (shard.records[-1].approximate_arrival_timestamp - last.approximate_arrival_timestamp)
                if last
                else 0
            )
            payload: dict[str, Any] = {
                "Records": batch,
                "ContinuationSequenceNumber": None
                if at_end
                else (last.sequence_number if last else str(shard.base)),
                "MillisBehindLatest": int(behind * 1000),
            }
            if at_end:
                payload["ChildShards"] = shard.children
            yield _event("SubscribeToShardEvent", msgspec.json.encode(payload))
            sub.events_sent += 1
            if at_end:
                return

    # -- HTTP/1.1 -------------------------------------------------------------------------------

    async def _aiohttp_handler(self, request: web.Request) -> web.StreamResponse:
        reply = await self.handle(request.headers.get("X-Amz-Target", ""), await request.read(), "http/1.1")
        if reply.parts is None:
            return web.Response(status=reply.status, body=reply.body, headers=dict(reply.headers))
        response = web.StreamResponse(status=reply.status, headers=dict(reply.headers))
        await response.prepare(request)
        async for part in reply.parts:
            if isinstance(part, bytes):
                await response.write(part)
            elif part is Action.STALL:
                await asyncio.Event().wait()  # until the server stops
            else:
                assert request.transport is not None  # noqa: S101 - set while the handler runs
                request.transport.abort()  # RESET, GOAWAY and KILL: HTTP/1.1 can only drop
                return response
        await response.write_eof()
        return response


def _ok(body: dict[str, Any]) -> H2Reply:
    return H2Reply(200, [("content-type", _JSON)], msgspec.json.encode(body))


def _error(code: str, message: str) -> H2Reply:
    body = msgspec.json.encode({"__type": code, "message": message})
    return H2Reply(500 if code.startswith("Internal") else 400, [("content-type", _JSON)], body)


def _event(event_type: str, payload: bytes) -> bytes:
    headers = {":message-type": "event", ":event-type": event_type, ":content-type": "application/json"}
    return encode_message(headers, payload)


def _exception(code: str, message: str) -> bytes:
    headers = {":message-type": "exception", ":exception-type": code, ":content-type": "application/json"}
    return encode_message(headers, msgspec.json.encode({"message": message}))


async def _fault(script: Script) -> AsyncGenerator[bytes | Action, None]:
    if script.fault is Fault.EXCEPTION:
        yield _exception(script.exception_type, "scripted failure")
    elif script.fault is Fault.TRUNCATE:
        frame = _event("SubscribeToShardEvent", b'{"Records": []}')
        yield frame[: len(frame) // 2]
    elif script.fault is Fault.CORRUPT:
        corrupt = bytearray(_event("SubscribeToShardEvent", b'{"Records": []}'))
        corrupt[-1] ^= 0xFF
        yield bytes(corrupt)
    elif script.fault is not Fault.END:
        yield Action[script.fault.name]


def _start_index(shard: _Shard, position: dict[str, Any]) -> int:
    kind, records = position["Type"], shard.records
    if kind == "TRIM_HORIZON":
        return 0
    if kind == "LATEST":
        return len(records)
    if kind == "AT_TIMESTAMP":
        return next(
            (i for i, r in enumerate(records) if r.approximate_arrival_timestamp >= position["Timestamp"]),
            len(records),
        )
    target = int(position["SequenceNumber"])
    after = kind == "AFTER_SEQUENCE_NUMBER"
    return next(
        (
            i
            for i, r in enumerate(records)
            if int(r.sequence_number) > target or (not after and int(r.sequence_number) == target)
        ),
        len(records),
    )
