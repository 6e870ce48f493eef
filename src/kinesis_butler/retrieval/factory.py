"""Which record source reads a shard: polling, or enhanced fan-out where the app asked for it and
the stream has it (registering the app's stream consumer once per stream).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from functools import partial
from typing import Any, Protocol, runtime_checkable

from kinesis_butler.config import ConsumerConfig
from kinesis_butler.errors import ButlerError, ResourceNotFound
from kinesis_butler.models import Lease, StartPosition
from kinesis_butler.retrieval.base import RecordSource
from kinesis_butler.retrieval.budget import process_budget
from kinesis_butler.retrieval.fanout import FanOutSource, ShardSubscriber
from kinesis_butler.retrieval.polling import PollingSource, ShardReader

__all__ = ["FanOutApi", "SourceFactory"]

log = logging.getLogger("kinesis_butler.retrieval")

_REGISTER_ATTEMPTS = 5


@runtime_checkable
class FanOutApi(ShardSubscriber, Protocol):
    """What enhanced fan-out needs beyond polling (KinesisClient has it; simple fakes do not)."""

    async def describe_stream_summary(self, stream: str) -> Any: ...

    async def ensure_stream_consumer(self, stream_arn: str, name: str) -> Any: ...


class SourceFactory:
    """Builds each shard's RecordSource for one consumer."""

    def __init__(
        self,
        client: ShardReader,
        app: str,
        config: ConsumerConfig,
        start_at: StartPosition,
        shard_start_at: Mapping[str, StartPosition],
    ) -> None:
        self.client = client
        self.app = app
        self.config = config
        self.start_at = start_at
        self.shard_start_at = dict(shard_start_at)
        self.fanout: dict[str, str | None] = {}  # stream -> fan-out consumer ARN (None: polling)

    async def register(self, stream: str) -> None:
        """Register (or find) this app's enhanced fan-out consumer on ``stream``; where fan-out is
        unavailable, warn and poll that stream instead."""
        if self.config.retrieval != "fanout" or stream in self.fanout:
            return
        name = self.config.fanout_consumer_name or self.app
        if not isinstance(self.client, FanOutApi):
            log.warning("stream %s: this Kinesis client has no enhanced fan-out; polling instead", stream)
            self.fanout[stream] = None
            return
        for attempt in range(1, _REGISTER_ATTEMPTS + 1):
            try:
                summary = await self.client.describe_stream_summary(stream)
                registered = await self.client.ensure_stream_consumer(summary.stream_arn, name)
                break
            except ButlerError as exc:
                # Throttling (many workers registering at once) or a consumer still being created
                # or deleted pass; what stays after a few tries, or cannot pass, means polling.
                if not exc.retriable or attempt == _REGISTER_ATTEMPTS:
                    log.warning("stream %s: enhanced fan-out unavailable (%s); polling instead", stream, exc)
                    self.fanout[stream] = None
                    return
                await asyncio.sleep(random.uniform(0.5, 1.0) * 2**attempt)
        log.info("stream %s: reading through enhanced fan-out consumer %s", stream, registered.consumer_arn)
        self.fanout[stream] = registered.consumer_arn

    async def _stream_exists(self, stream: str) -> bool:
        describe = getattr(self.client, "describe_stream_summary", None)
        if describe is None:
            return False
        try:
            await describe(stream)
        except ResourceNotFound:
            return False
        return True

    def source_for(self, stream: str, lease: Lease) -> RecordSource:
        shard_id = lease.shard
        start = (
            self.shard_start_at.get(f"{stream}/{shard_id}")
            or self.shard_start_at.get(shard_id)
            or self.start_at
        )
        hash_range = None
        low, high = lease.starting_hash_key, lease.ending_hash_key
        if low is not None and high is not None and self.config.drop_misrouted_subrecords:
            hash_range = (int(low), int(high))
        budget = process_budget(self.config.prefetch_budget_bytes)

        def polling() -> PollingSource:
            return PollingSource(
                self.client,
                stream,
                shard_id,
                self.config,
                start,
                budget=budget,
                hash_range=hash_range,
                stream_exists=partial(self._stream_exists, stream),
                app=self.app,
            )

        consumer_arn = self.fanout.get(stream)
        if consumer_arn is None or not isinstance(self.client, FanOutApi):
            return polling()
        return FanOutSource(
            self.client,
            stream,
            shard_id,
            consumer_arn=consumer_arn,
            config=self.config,
            start_position=start,
            budget=budget,
            hash_range=hash_range,
            fallback=polling,
        )
