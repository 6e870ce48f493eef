"""Enhanced fan-out: the consumer operations and SubscribeToShard, mixed into ``KinesisClient``.

:class:`ShardSubscription` is one SubscribeToShard call: an async context manager that is an
async iterator of events, streamed over :mod:`kinesis_butler.aws.http2` (HTTP/2 where the
endpoint speaks it, as AWS does).

The answer is an event stream (see :mod:`kinesis_butler.aws.eventstream`). AWS opens it with an
``initial-response`` event (kinesis-local sends none; either way it is skipped), then sends
``SubscribeToShardEvent`` events, JSON decoded straight into :class:`SubscribeToShardEvent` with
its :class:`~kinesis_butler.models.Record` values. The stream ends after at most 5 minutes, or
after the last event of a closed shard; the iterator then just ends.

Errors: an HTTP error answer raises at ``async with`` and an exception frame raises from the
iterator, both typed by :func:`~kinesis_butler.aws.transport.error_from_response`
(``ResourceInUse``, ``ResourceNotFound``, ``Throttled``, ``ServiceUnavailable`` for
``InternalFailureException``, ...). Malformed frames or JSON raise ``EventStreamError``; a broken
connection ``ConnectionLost``. Both are retriable: resubscribe from the last continuation.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, Protocol, Self, runtime_checkable

import msgspec

from kinesis_butler.aws._client import wait_until_active
from kinesis_butler.aws.eventstream import EventStreamDecoder, Message
from kinesis_butler.aws.kinesis_shapes import (
    StreamConsumer,
    SubscribeToShardEvent,
    _ConsumerInput,
    _DescribeStreamConsumerOutput,
    _ListStreamConsumersInput,
    _ListStreamConsumersOutput,
    _RegisterStreamConsumerInput,
    _RegisterStreamConsumerOutput,
    _StartingPosition,
    _SubscribeToShardInput,
    _WireSubscribeToShardEvent,
)
from kinesis_butler.aws.kinesis_shapes import decode_response as _decode
from kinesis_butler.aws.streaming import StreamingHttpClient, StreamingResponse
from kinesis_butler.aws.transport import Transport, error_from_response
from kinesis_butler.errors import AwsError, ClosedError, ConfigError, EventStreamError, ResourceInUse

__all__ = ["FanOutOperations", "ShardSubscription", "SigningTransport", "check_starting_position"]

logger = logging.getLogger(__name__)

_OPERATION: Final = "SubscribeToShard"
_event_decoder: Final = msgspec.json.Decoder(_WireSubscribeToShardEvent)
_register_consumer_decoder: Final = msgspec.json.Decoder(_RegisterStreamConsumerOutput)
_describe_consumer_decoder: Final = msgspec.json.Decoder(_DescribeStreamConsumerOutput)
_list_consumers_decoder: Final = msgspec.json.Decoder(_ListStreamConsumersOutput)
_encoder: Final = msgspec.json.Encoder()
_SEQUENCE_TYPES: Final = frozenset({"AT_SEQUENCE_NUMBER", "AFTER_SEQUENCE_NUMBER"})
_POSITION_TYPES: Final = frozenset({*_SEQUENCE_TYPES, "TRIM_HORIZON", "LATEST", "AT_TIMESTAMP"})
_error_encoder: Final = msgspec.json.Encoder()
# Exception frames carry no HTTP status; these codes are server faults (retriable).
_SERVER_FAULTS: Final = frozenset(
    {"InternalFailureException", "InternalFailure", "ServiceUnavailableException", "ServiceUnavailable"}
)


@runtime_checkable
class SigningTransport(Protocol):
    """A transport that can sign a request another client sends (``JsonTransport`` does)."""

    async def signed_headers(self, operation: str, body: bytes) -> dict[str, str]:
        """The signed headers of one ``operation`` request with ``body``."""
        ...


class ShardSubscription:
    """An open SubscribeToShard call. Enter it, then iterate its events.

    Created by :meth:`KinesisClient.subscribe_to_shard`; each instance is used once.

    Example:
        >>> async with kinesis.subscribe_to_shard(arn, "shardId-000000000000", "LATEST") as sub:
        ...     async for event in sub:
        ...         handle(event.records)
        ...         position = event.continuation_sequence_number

    Attributes:
        consumer_arn: the consumer.
        shard_id: the shard.
        request_id: the ``x-amzn-RequestId`` of the call, once entered.
    """

    def __init__(
        self,
        opener: Callable[[], AbstractAsyncContextManager[StreamingResponse]],
        *,
        consumer_arn: str,
        shard_id: str,
    ) -> None:
        self.consumer_arn = consumer_arn
        self.shard_id = shard_id
        self.request_id: str | None = None
        self._opener = opener
        self._stack = contextlib.AsyncExitStack()
        self._response: StreamingResponse | None = None
        self._decoder = EventStreamDecoder()
        self._pending: deque[Message] = deque()
        self._entered = False
        self._done = False

    def __repr__(self) -> str:
        return f"ShardSubscription(shard_id={self.shard_id!r}, protocol={self.protocol!r}, done={self._done})"

    @property
    def protocol(self) -> str | None:
        """``h2`` or ``http/1.1`` once entered."""
        return self._response.protocol if self._response is not None else None

    async def __aenter__(self) -> Self:
        """Send the request and wait for the response headers.

        Raises:
            AwsError: the service refused (``ResourceInUse`` within 5 s of another subscription,
                ``ResourceNotFound``, ``Throttled``, ``InvalidArgument``, ...).
            EndpointUnreachable: no connection could be made (``ConnectionLost`` included).
            ClosedError: the subscription or its client was already used or closed.
        """
        if self._entered:
            raise ClosedError("a ShardSubscription can be entered only once; subscribe again")
        self._entered = True
        refusal: AwsError | None = None
        try:
            response = await self._stack.enter_async_context(self._opener())
            self.request_id = response.headers.get("x-amzn-requestid")
            if response.status != 200:
                refusal = await self._refusal(response)
        except BaseException:
            await self.aclose()
            raise
        if refusal is not None:
            await self.aclose()
            raise refusal
        self._response = response
        return self

    async def _refusal(self, response: StreamingResponse) -> AwsError:
        body = await response.read_all()
        error_type = response.headers.get("x-amzn-errortype")
        return error_from_response(_OPERATION, response.status, body, self.request_id, error_type)

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """End the subscription (resets the stream if it is still open). Idempotent."""
        self._done = True
        self._pending.clear()
        await self._stack.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> SubscribeToShardEvent:
        """The next event; ends when the service ends the subscription.

        Raises:
            AwsError: an exception frame (typed as described in the module doc).
            EventStreamError: a malformed or truncated frame or event.
            ConnectionLost: the stream or connection broke, or stayed silent too long.
        """
        response = self._response
        if response is None:
            raise ClosedError("enter the subscription with `async with` before iterating it")
        while True:
            while self._pending:
                event = self._event_of(self._pending.popleft())
                if event is not None:
                    return event
            if self._done:
                raise StopAsyncIteration
            try:
                chunk = await response.read_chunk()
                if not chunk:
                    self._done = True
                    self._decoder.close()
                    raise StopAsyncIteration
                self._pending.extend(self._decoder.feed(chunk))
            except EventStreamError as exc:
                self._done = True
                exc.operation, exc.request_id = _OPERATION, self.request_id
                raise

    def _event_of(self, message: Message) -> SubscribeToShardEvent | None:
        kind = message.message_type
        if kind == "event":
            if message.event_type == "SubscribeToShardEvent":
                return self._decode_event(message.payload)
            logger.debug("%s: skipping %s event", self.shard_id, message.event_type)
            return None
        self._done = True
        self._pending.clear()
        if kind == "exception":
            code = message.exception_type or ""
            status = 500 if code in _SERVER_FAULTS else 400
            raise error_from_response(_OPERATION, status, message.payload, self.request_id, code)
        if kind == "error":
            code = str(message.headers.get(":error-code", ""))
            body = _error_encoder.encode(
                {"__type": code, "message": str(message.headers.get(":error-message", ""))}
            )
            raise error_from_response(
                _OPERATION, 500 if code in _SERVER_FAULTS else 400, body, self.request_id
            )
        raise self._malformed(f"a message with :message-type {kind!r}")

    def _decode_event(self, payload: bytes) -> SubscribeToShardEvent:
        try:
            wire = _event_decoder.decode(payload)
        except msgspec.DecodeError as exc:
            self._done = True
            self._pending.clear()
            raise self._malformed(f"a malformed SubscribeToShardEvent ({exc})") from exc
        return SubscribeToShardEvent(
            wire.records or [],
            wire.continuation_sequence_number,
            wire.millis_behind_latest or 0,
            wire.child_shards or [],
        )

    def _malformed(self, what: str) -> EventStreamError:
        return EventStreamError(
            f"the subscription to {self.shard_id} sent {what}",
            operation=_OPERATION,
            code="MalformedEventStream",
            request_id=self.request_id,
        )


class FanOutOperations:
    """The enhanced fan-out operations of :class:`~kinesis_butler.aws.KinesisClient`."""

    _transport: Transport
    _streaming: StreamingHttpClient

    async def _call(self, operation: str, request: Any, *, max_attempts: int | None = None) -> bytes:
        raise NotImplementedError

    async def register_stream_consumer(self, stream_arn: str, name: str) -> StreamConsumer:
        """Register an enhanced fan-out consumer; it is ``CREATING`` until it turns ``ACTIVE``.

        Raises:
            ResourceInUse: a consumer of that name exists (or the stream is busy).
            Throttled: at most 20 consumers per stream, and 5 registrations per second.
        """
        raw = await self._call("RegisterStreamConsumer", _RegisterStreamConsumerInput(stream_arn, name))
        return _decode(_register_consumer_decoder, raw, "RegisterStreamConsumer").consumer.to_consumer(
            stream_arn
        )

    async def describe_stream_consumer(
        self, *, stream_arn: str | None = None, name: str | None = None, consumer_arn: str | None = None
    ) -> StreamConsumer:
        """Describe a consumer, by ``consumer_arn`` or by ``stream_arn`` and ``name``.

        Raises:
            ConfigError: neither way of naming the consumer was given.
            ResourceNotFound: no such consumer.
        """
        request = _consumer_input(stream_arn, name, consumer_arn)
        raw = await self._call("DescribeStreamConsumer", request)
        wire = _decode(_describe_consumer_decoder, raw, "DescribeStreamConsumer").consumer_description
        return wire.to_consumer(stream_arn or "")

    async def list_stream_consumers(
        self, stream_arn: str, *, max_results: int | None = None
    ) -> list[StreamConsumer]:
        """Every consumer registered on a stream, following pagination.

        Raises:
            ResourceNotFound: the stream does not exist.
        """
        consumers: list[StreamConsumer] = []
        request = _ListStreamConsumersInput(stream_arn, max_results=max_results)
        while True:
            raw = await self._call("ListStreamConsumers", request)
            page = _decode(_list_consumers_decoder, raw, "ListStreamConsumers")
            consumers.extend(wire.to_consumer(stream_arn) for wire in page.consumers or ())
            # kinesis-local returns a token with every non-empty page; the next one is empty.
            if not page.next_token or not page.consumers:
                return consumers
            request = _ListStreamConsumersInput(
                stream_arn, next_token=page.next_token, max_results=max_results
            )

    async def deregister_stream_consumer(
        self, *, stream_arn: str | None = None, name: str | None = None, consumer_arn: str | None = None
    ) -> None:
        """Deregister a consumer (by ARN, or stream ARN and name); it is ``DELETING`` for a while.

        Raises:
            ConfigError: neither way of naming the consumer was given.
            ResourceNotFound: no such consumer.
        """
        await self._call("DeregisterStreamConsumer", _consumer_input(stream_arn, name, consumer_arn))

    async def wait_for_consumer_active(
        self,
        *,
        stream_arn: str | None = None,
        name: str | None = None,
        consumer_arn: str | None = None,
        timeout: float = 60.0,  # noqa: ASYNC109 - public API
    ) -> StreamConsumer:
        """Poll DescribeStreamConsumer until the consumer is ``ACTIVE`` (AWS takes a few seconds).

        Raises:
            ResourceNotFound: the consumer still did not exist at the deadline.
            ResourceInUse: it was not active at the deadline.
        """
        _consumer_input(stream_arn, name, consumer_arn)
        return await wait_until_active(
            lambda: self.describe_stream_consumer(
                stream_arn=stream_arn, name=name, consumer_arn=consumer_arn
            ),
            lambda consumer: consumer.consumer_status,
            what=f"consumer {consumer_arn or name!r}",
            operation="DescribeStreamConsumer",
            timeout=timeout,
        )

    async def ensure_stream_consumer(
        self,
        stream_arn: str,
        name: str,
        *,
        timeout: float = 60.0,  # noqa: ASYNC109 - public API
    ) -> StreamConsumer:
        """Register the consumer unless it exists (workers may race to), then wait until ``ACTIVE``.

        Raises:
            ResourceInUse: it did not become active in time (e.g. it is being deleted).
            Throttled: the stream has 20 consumers already.
        """
        with contextlib.suppress(ResourceInUse):  # registered already, by us or by another worker
            await self.register_stream_consumer(stream_arn, name)
        return await self.wait_for_consumer_active(stream_arn=stream_arn, name=name, timeout=timeout)

    def subscribe_to_shard(
        self,
        consumer_arn: str,
        shard_id: str,
        starting_position_type: str,
        *,
        sequence_number: str | None = None,
        timestamp: float | None = None,
    ) -> ShardSubscription:
        """Subscribe a consumer to a shard: the records are pushed for up to 5 minutes.

        Nothing is sent until the subscription is entered with ``async with``; it is then an
        async iterator of :class:`SubscribeToShardEvent` (see :class:`ShardSubscription` for the
        errors). Resubscribe with ``AFTER_SEQUENCE_NUMBER`` and the last event's
        ``continuation_sequence_number``; at most once per second per consumer and shard, and a
        new subscription within 5 s of the previous one gets ``ResourceInUse``.

        Args:
            consumer_arn: an ``ACTIVE`` consumer's ARN.
            shard_id: the shard.
            starting_position_type: ``TRIM_HORIZON``, ``LATEST``, ``AT_SEQUENCE_NUMBER``,
                ``AFTER_SEQUENCE_NUMBER`` or ``AT_TIMESTAMP``.
            sequence_number: with ``AT_SEQUENCE_NUMBER`` / ``AFTER_SEQUENCE_NUMBER``.
            timestamp: epoch seconds, with ``AT_TIMESTAMP``.

        Raises:
            ConfigError: the position type is unknown, its argument missing, or this client's
                transport cannot sign requests for another client (a test double).
        """
        check_starting_position(starting_position_type, sequence_number, timestamp)
        transport = self._transport
        if not isinstance(transport, SigningTransport):
            raise ConfigError("SubscribeToShard needs a transport with signed_headers (JsonTransport)")
        position = _StartingPosition(starting_position_type, sequence_number, timestamp)
        body = _encoder.encode(_SubscribeToShardInput(consumer_arn, shard_id, position))
        url = transport.endpoint_url

        @contextlib.asynccontextmanager
        async def open_stream() -> AsyncIterator[StreamingResponse]:
            headers = await transport.signed_headers("SubscribeToShard", body)
            async with self._streaming.post(url, headers, body) as response:
                yield response

        return ShardSubscription(open_stream, consumer_arn=consumer_arn, shard_id=shard_id)


def _consumer_input(stream_arn: str | None, name: str | None, consumer_arn: str | None) -> _ConsumerInput:
    if consumer_arn is None and (stream_arn is None or name is None):
        raise ConfigError("name the consumer by consumer_arn, or by stream_arn and name")
    if consumer_arn is not None:
        return _ConsumerInput(consumer_arn=consumer_arn)
    return _ConsumerInput(stream_arn=stream_arn, consumer_name=name)


def check_starting_position(kind: str, sequence_number: str | None, timestamp: float | None) -> None:
    """Validate a shard iterator / starting position type and the argument it needs.

    Raises:
        ConfigError: the type is unknown, or its sequence number / timestamp is missing or extra.
    """
    if kind not in _POSITION_TYPES:
        raise ConfigError(
            f"unknown starting position {kind!r}: use one of {', '.join(sorted(_POSITION_TYPES))}"
        )
    if (kind in _SEQUENCE_TYPES) != (sequence_number is not None):
        raise ConfigError("a sequence_number is required with AT/AFTER_SEQUENCE_NUMBER and only with them")
    if (kind == "AT_TIMESTAMP") != (timestamp is not None):
        raise ConfigError("a timestamp is required with AT_TIMESTAMP and only with it")
