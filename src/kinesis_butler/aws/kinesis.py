"""Typed Kinesis Data Streams operations over the JSON transport.

Request and response shapes are msgspec Structs whose fields map to the wire names, so bodies are
encoded and decoded in one C pass each. Timestamps stay float epoch seconds (the wire format) and
``Data`` is a ``bytes`` field, which msgspec base64-decodes while parsing. GetRecords decodes
straight into :class:`kinesis_butler.models.Record` with a decoder built once at import.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from kinesis_butler.aws._client import JsonServiceClient, wait_until_active
from kinesis_butler.aws.credentials import AwsCredentials, CredentialsProvider
from kinesis_butler.aws.kinesis_fanout import FanOutOperations, ShardSubscription, check_starting_position
from kinesis_butler.aws.kinesis_shapes import (
    ChildShard,
    GetRecordsResult,
    HashKeyRange,
    PutRecordResult,
    PutRecordsEntry,
    PutRecordsResult,
    PutRecordsResultEntry,
    ShardFilter,
    StreamConsumer,
    StreamSummary,
    SubscribeToShardEvent,
    _CreateStreamInput,
    _DeleteStreamInput,
    _DescribeStreamSummaryOutput,
    _GetRecordsInput,
    _GetRecordsOutput,
    _GetShardIteratorInput,
    _GetShardIteratorOutput,
    _ListShardsInput,
    _ListShardsOutput,
    _MergeShardsInput,
    _PutRecordInput,
    _PutRecordsInput,
    _SplitShardInput,
    _StreamNameInput,
    _UpdateShardCountInput,
    _WireShard,
)
from kinesis_butler.aws.kinesis_shapes import decode_response as _decode
from kinesis_butler.aws.streaming import StreamingHttpClient, StreamingOptions
from kinesis_butler.aws.transport import JsonTransport, Transport, TransportOptions
from kinesis_butler.models import Shard

__all__ = [
    "ChildShard",
    "GetRecordsResult",
    "HashKeyRange",
    "KinesisClient",
    "PutRecordResult",
    "PutRecordsEntry",
    "PutRecordsResult",
    "PutRecordsResultEntry",
    "ShardFilter",
    "ShardSubscription",
    "StreamConsumer",
    "StreamSummary",
    "SubscribeToShardEvent",
]

_TARGET_PREFIX: Final = "Kinesis_20131202"


_encoder: Final = msgspec.json.Encoder()
_get_records_decoder: Final = msgspec.json.Decoder(_GetRecordsOutput)
_describe_decoder: Final = msgspec.json.Decoder(_DescribeStreamSummaryOutput)
_list_shards_decoder: Final = msgspec.json.Decoder(_ListShardsOutput)
_iterator_decoder: Final = msgspec.json.Decoder(_GetShardIteratorOutput)
_put_records_decoder: Final = msgspec.json.Decoder(PutRecordsResult)
_put_record_decoder: Final = msgspec.json.Decoder(PutRecordResult)


def _decode_get_records(raw: bytes | memoryview) -> _GetRecordsOutput:
    return _decode(_get_records_decoder, raw, "GetRecords")  # type: ignore[arg-type]  # any buffer


def _decode_sized(raw: bytes | memoryview) -> tuple[_GetRecordsOutput, int]:
    return _decode_get_records(raw), len(raw)


def _to_shard(wire: _WireShard) -> Shard:
    return Shard(
        shard_id=wire.shard_id,
        parent_shard_id=wire.parent_shard_id,
        adjacent_parent_shard_id=wire.adjacent_parent_shard_id,
        starting_hash_key=int(wire.hash_key_range.starting_hash_key),
        ending_hash_key=int(wire.hash_key_range.ending_hash_key),
        starting_sequence_number=wire.sequence_number_range.starting_sequence_number,
        ending_sequence_number=wire.sequence_number_range.ending_sequence_number,
    )


class KinesisClient(FanOutOperations, JsonServiceClient):
    """An async client for the Kinesis Data Streams operations kinesis-butler uses.

    The enhanced fan-out operations (consumers, SubscribeToShard) come from
    :class:`~kinesis_butler.aws.kinesis_fanout.FanOutOperations`.

    Example:
        >>> async with KinesisClient(region="us-east-1") as kinesis:
        ...     shards = await kinesis.list_shards("orders")
        ...     it = await kinesis.get_shard_iterator("orders", shards[0].shard_id, "TRIM_HORIZON")
        ...     batch = await kinesis.get_records(it)
    """

    _SERVICE = "kinesis"
    _TARGET_PREFIX = _TARGET_PREFIX

    def __init__(
        self,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        credentials: CredentialsProvider | AwsCredentials | None = None,
        profile: str | None = None,
        transport_options: TransportOptions | None = None,
        transport: Transport | None = None,
        streaming_options: StreamingOptions | None = None,
    ) -> None:
        """Create a client. No connection is made until the first call.

        Args:
            region: the region; otherwise the profile's, ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.
            endpoint_url: e.g. ``http://127.0.0.1:4567`` for the emulator; defaults to the
                regional AWS endpoint.
            credentials: a provider, fixed credentials, or ``None`` for botocore's chain.
            profile: a shared-config profile for the chain (not with ``credentials``).
            transport_options: timeouts, retries and pool size.
            transport: a ready transport (tests); the other arguments are then ignored.
            streaming_options: how SubscribeToShard connects (HTTP/2, TLS trust, timeouts).

        Raises:
            ConfigError: no region is configured, or both ``credentials`` and ``profile`` given.
        """
        super().__init__(
            region=region,
            endpoint_url=endpoint_url,
            credentials=credentials,
            profile=profile,
            transport_options=transport_options,
            transport=transport,
        )
        self._streaming = StreamingHttpClient(streaming_options)

    async def aclose(self) -> None:
        """Close every connection, subscriptions included. Idempotent; the client cannot be reused."""
        await self._streaming.aclose()
        await super().aclose()

    async def _call(self, operation: str, request: Any, *, max_attempts: int | None = None) -> bytes:
        return await self._transport.call(operation, _encoder.encode(request), max_attempts=max_attempts)

    # -- reading ------------------------------------------------------------------------------

    async def describe_stream_summary(self, stream: str) -> StreamSummary:
        """Describe a stream without listing its shards.

        Raises:
            ResourceNotFound: the stream does not exist.
        """
        raw = await self._call("DescribeStreamSummary", _StreamNameInput(stream))
        wire = _decode(_describe_decoder, raw, "DescribeStreamSummary").stream_description_summary
        return StreamSummary(
            stream_name=wire.stream_name,
            stream_arn=wire.stream_arn,
            stream_status=wire.stream_status,
            open_shard_count=wire.open_shard_count,
            retention_period_hours=wire.retention_period_hours,
            stream_creation_timestamp=wire.stream_creation_timestamp,
            stream_mode=wire.stream_mode_details.stream_mode if wire.stream_mode_details else "PROVISIONED",
            consumer_count=wire.consumer_count or 0,
            encryption_type=wire.encryption_type,
        )

    async def list_shards(
        self, stream: str, *, shard_filter: ShardFilter | None = None, max_results: int | None = None
    ) -> list[Shard]:
        """List a stream's shards (open and, within retention, closed), following pagination.

        Args:
            stream: the stream name.
            shard_filter: which shards to return; all by default.
            max_results: page size (1-10000); the service default (1000) when ``None``.

        Returns:
            Every shard, in the order the service lists them.

        Raises:
            ResourceNotFound: the stream does not exist.
        """
        shards: list[Shard] = []
        request = _ListShardsInput(stream_name=stream, max_results=max_results, shard_filter=shard_filter)
        while True:
            raw = await self._call("ListShards", request)
            page = _decode(_list_shards_decoder, raw, "ListShards")
            shards.extend(_to_shard(wire) for wire in page.shards or ())
            if not page.next_token:
                return shards
            # The token carries the stream and filter; sending StreamName with it is an error.
            request = _ListShardsInput(next_token=page.next_token, max_results=max_results)

    async def get_shard_iterator(
        self,
        stream: str,
        shard_id: str,
        iterator_type: str,
        *,
        sequence_number: str | None = None,
        timestamp: float | None = None,
    ) -> str:
        """Get an iterator to start reading a shard from (valid for 5 minutes).

        Args:
            stream: the stream name.
            shard_id: the shard.
            iterator_type: ``TRIM_HORIZON``, ``LATEST``, ``AT_SEQUENCE_NUMBER``,
                ``AFTER_SEQUENCE_NUMBER`` or ``AT_TIMESTAMP``.
            sequence_number: with ``AT_SEQUENCE_NUMBER`` / ``AFTER_SEQUENCE_NUMBER``.
            timestamp: epoch seconds, with ``AT_TIMESTAMP``.

        Returns:
            The shard iterator.

        Raises:
            ConfigError: the type is unknown or its sequence number / timestamp is missing.
            ResourceNotFound: the stream or shard does not exist.
        """
        check_starting_position(iterator_type, sequence_number, timestamp)
        request = _GetShardIteratorInput(
            stream_name=stream,
            shard_id=shard_id,
            shard_iterator_type=iterator_type,
            starting_sequence_number=sequence_number,
            timestamp=timestamp,
        )
        raw = await self._call("GetShardIterator", request)
        return _decode(_iterator_decoder, raw, "GetShardIterator").shard_iterator

    async def get_records(
        self, shard_iterator: str, *, limit: int | None = None, max_attempts: int | None = None
    ) -> GetRecordsResult:
        """Read the next batch of records of a shard.

        Args:
            shard_iterator: from :meth:`get_shard_iterator` or the previous result.
            limit: at most this many records (1-10000).
            max_attempts: this call's retry budget; ``1`` lets the caller handle throttling.

        Returns:
            The records, the next iterator (``None`` at the end of a closed shard), the lag and,
            at shard end, the child shards.

        Raises:
            ExpiredIterator: the iterator is older than 5 minutes (never retried here).
            Throttled: the shard's read quota stayed exceeded through every retry.
        """
        request = _encoder.encode(_GetRecordsInput(shard_iterator, limit))
        transport = self._transport
        if isinstance(transport, JsonTransport):
            # Decoded straight from the transport's reused read buffer: no per-call copy of a
            # multi-megabyte answer (the page faults of that cost as much as the decode).
            wire, size = await transport.call_decoded(
                "GetRecords", request, _decode_sized, max_attempts=max_attempts
            )
        else:
            wire, size = _decode_sized(await transport.call("GetRecords", request, max_attempts=max_attempts))
        return GetRecordsResult(
            wire.records or [],
            wire.next_shard_iterator,
            wire.millis_behind_latest,
            wire.child_shards or [],
            size,
        )

    # -- writing ------------------------------------------------------------------------------

    async def put_records(self, stream: str, entries: list[PutRecordsEntry]) -> PutRecordsResult:
        """Write up to 500 records in one call. Check ``failed_record_count``: failures are per entry.

        Raises:
            ResourceNotFound: the stream does not exist.
            InvalidArgument: too many entries, or an entry is too large.
        """
        raw = await self._call("PutRecords", _PutRecordsInput(stream_name=stream, records=entries))
        return _decode(_put_records_decoder, raw, "PutRecords")

    async def put_record(
        self, stream: str, data: bytes, partition_key: str, *, explicit_hash_key: str | None = None
    ) -> PutRecordResult:
        """Write one record.

        Raises:
            ResourceNotFound: the stream does not exist.
        """
        request = _PutRecordInput(
            stream_name=stream, data=data, partition_key=partition_key, explicit_hash_key=explicit_hash_key
        )
        raw = await self._call("PutRecord", request)
        return _decode(_put_record_decoder, raw, "PutRecord")

    # -- administration -----------------------------------------------------------------------

    async def create_stream(self, stream: str, shard_count: int) -> None:
        """Create a provisioned stream; it is ``CREATING`` until :meth:`wait_for_active` returns.

        Raises:
            ResourceInUse: a stream of that name exists.
        """
        await self._call("CreateStream", _CreateStreamInput(stream_name=stream, shard_count=shard_count))

    async def delete_stream(self, stream: str, *, enforce_consumer_deletion: bool = False) -> None:
        """Delete a stream (with its registered consumers when ``enforce_consumer_deletion``).

        Raises:
            ResourceNotFound: the stream does not exist.
        """
        await self._call(
            "DeleteStream",
            _DeleteStreamInput(stream_name=stream, enforce_consumer_deletion=enforce_consumer_deletion),
        )

    async def wait_for_active(self, stream: str, *, timeout: float = 30.0) -> StreamSummary:  # noqa: ASYNC109 - public API
        """Poll DescribeStreamSummary until the stream is ``ACTIVE``.

        A stream just created may briefly be unknown (the API is eventually consistent), so
        ``ResourceNotFound`` is tolerated until the deadline.

        Args:
            stream: the stream name.
            timeout: seconds to wait.

        Returns:
            The summary of the active stream.

        Raises:
            ResourceNotFound: the stream still did not exist at the deadline.
            ResourceInUse: the stream was not active at the deadline.
        """
        return await wait_until_active(
            lambda: self.describe_stream_summary(stream),
            lambda summary: summary.stream_status,
            what=f"stream {stream!r}",
            operation="DescribeStreamSummary",
            timeout=timeout,
        )

    async def split_shard(self, stream: str, shard_id: str, new_starting_hash_key: int) -> None:
        """Split a shard in two at ``new_starting_hash_key`` (the first key of the upper child).

        Raises:
            ResourceInUse: the stream is not ACTIVE.
            InvalidArgument: the hash key is outside the shard's range.
        """
        request = _SplitShardInput(
            stream_name=stream, shard_to_split=shard_id, new_starting_hash_key=str(new_starting_hash_key)
        )
        await self._call("SplitShard", request)

    async def merge_shards(self, stream: str, shard_id: str, adjacent_shard_id: str) -> None:
        """Merge two shards with adjacent hash key ranges into one.

        Raises:
            ResourceInUse: the stream is not ACTIVE.
            InvalidArgument: the shards are not adjacent.
        """
        request = _MergeShardsInput(
            stream_name=stream, shard_to_merge=shard_id, adjacent_shard_to_merge=adjacent_shard_id
        )
        await self._call("MergeShards", request)

    async def update_shard_count(self, stream: str, target: int) -> None:
        """Reshard uniformly to ``target`` open shards.

        Raises:
            ResourceInUse: the stream is not ACTIVE.
            Throttled: the UpdateShardCount quota was exceeded.
        """
        request = _UpdateShardCountInput(
            stream_name=stream, target_shard_count=target, scaling_type="UNIFORM_SCALING"
        )
        await self._call("UpdateShardCount", request)
