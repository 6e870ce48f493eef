"""Which streams an application reads, and how their leases are named.

One stream: lease keys are bare shard ids (the KCL's single-stream table). Several streams (or
``multi_stream=True``): keys are ``account:stream:creationEpoch:shardId`` and each lease's
``stream_name`` holds the identifier ``account:stream:creationEpoch``, as the KCL's
multi-stream mode writes them, so a re-created stream of the same name never inherits the old
stream's checkpoints. Streams can be added and removed while workers run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Protocol

from kinesis_butler.errors import ConfigError, ResourceNotFound
from kinesis_butler.models import Lease

__all__ = ["StreamInfo", "StreamTracker"]


class _Describer(Protocol):
    async def describe_stream_summary(self, stream: str) -> Any: ...


@dataclasses.dataclass(frozen=True, slots=True)
class StreamInfo:
    """A stream this application reads."""

    name: str
    identifier: str | None  # ``account:name:creationEpoch`` in multi-stream mode, else None


def _identifier(name: str, summary: Any) -> str:
    arn = str(getattr(summary, "stream_arn", "") or "")
    parts = arn.split(":")
    account = parts[4] if len(parts) > 4 and parts[4] else "000000000000"
    epoch = int(float(getattr(summary, "stream_creation_timestamp", 0) or 0))
    return f"{account}:{name}:{epoch}"


class StreamTracker:
    """The set of streams, resolved to identifiers, and the mapping from leases to streams."""

    def __init__(self, names: Iterable[str], *, multi_stream: bool | None = None) -> None:
        wanted = list(dict.fromkeys(names))
        if not wanted or any(not name for name in wanted):
            raise ConfigError("at least one non-empty stream name is required")
        self.multi_stream = len(wanted) > 1 if multi_stream is None else multi_stream
        if len(wanted) > 1 and not self.multi_stream:
            raise ConfigError("several streams need multi_stream=True (lease keys must be namespaced)")
        self._wanted = wanted
        self.streams: dict[str, StreamInfo] = {}
        self._by_identifier: dict[str, StreamInfo] = {}

    @property
    def names(self) -> list[str]:
        return list(self.streams)

    async def resolve_all(self, client: _Describer) -> None:
        """Describe every wanted stream; ConfigError naming any that does not exist."""
        for name in list(self._wanted):
            await self.add(client, name)

    async def add(self, client: _Describer, name: str) -> StreamInfo:
        """Start reading ``name`` (multi-stream mode only once running)."""
        if name in self.streams:
            return self.streams[name]
        if self.streams and not self.multi_stream:
            raise ConfigError("this consumer reads one stream; create it with multi_stream=True to add more")
        try:
            summary = await client.describe_stream_summary(name)
        except ResourceNotFound:
            raise ConfigError(
                f"stream {name!r} does not exist at this endpoint/region; "
                "check --stream, --region and --endpoint-url"
            ) from None
        info = StreamInfo(name, _identifier(name, summary) if self.multi_stream else None)
        self.streams[name] = info
        if info.identifier:
            self._by_identifier[info.identifier] = info
        if name not in self._wanted:
            self._wanted.append(name)
        return info

    def remove(self, name: str) -> StreamInfo | None:
        """Stop reading ``name``; its leases are no longer taken (they stay in the store)."""
        info = self.streams.pop(name, None)
        if name in self._wanted:
            self._wanted.remove(name)
        if info is not None and info.identifier:
            self._by_identifier.pop(info.identifier, None)
        return info

    def stream_of(self, lease: Lease) -> StreamInfo | None:
        """The stream a lease belongs to, or None if this application no longer reads it."""
        if not self.multi_stream:
            return next(iter(self.streams.values()), None) if lease.stream_name is None else None
        return self._by_identifier.get(lease.stream_name or "")
