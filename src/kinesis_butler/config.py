"""Validated, frozen configuration. The one place that reads environment variables.

Every field is checked in ``__post_init__``; a bad value raises ConfigError naming the field,
the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import uuid

from kinesis_butler.errors import ConfigError

__all__ = ["ConsumerConfig", "default_worker_id", "env"]


_CONSUMER_NAME = re.compile(r"[a-zA-Z0-9_.-]{1,128}")


def env(name: str, default: str | None = None) -> str | None:
    """Read an environment variable (the only place the package does)."""
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def default_worker_id() -> str:
    """``host:pid:random`` — unique per process, readable in lease tables."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class ConsumerConfig:
    """How a consumer worker behaves. The defaults follow the KCL's where it has one.

    Attributes:
        failover_time: seconds a lease's counter may stay unchanged before other workers
            consider it expired (KCL ``failoverTimeMillis``, 10 s).
        renew_interval: seconds between lease renewals; default failover_time / 3.
        take_interval: seconds between reads of the lease table to take, steal and detect
            expired leases; default failover_time / 3. Expiry is judged from when a worker
            first *saw* a counter value, so a dead worker's shards are taken over within
            failover_time + take_interval: keep it at most the renew interval.
        shard_sync_interval: seconds between ListShards calls that discover new shards.
        idle_poll_interval: seconds between GetRecords calls when the shard is caught up.
        min_poll_interval: the least time between two GetRecords on one shard (5 per second quota).
        max_records: GetRecords ``Limit`` (1..10,000).
        processor_max_attempts: how many times a batch is offered to a processor that raises
            before the shard is stopped with ProcessorFailed.
        processor_retry_base: first retry delay after a processor failure, doubled per attempt.
        processor_retry_cap: the largest retry delay.
        shutdown_timeout: seconds a graceful shutdown waits for in-flight batches.
        max_leases: the most leases this worker holds (None: no limit).
        read_quota_share: the part of each shard's read quota (5 GetRecords and 2 MiB per
            second) this app may use; set 0.5 in each of two polling apps on one stream and
            neither is throttled by the other.
        shard_read_calls_per_second: Kinesis's per-shard GetRecords quota (5). Raise it only for a
            server without that quota (an emulator, a test fake).
        shard_read_bytes_per_second: Kinesis's per-shard read throughput quota (2 MiB).
        drop_misrouted_subrecords: drop KPL sub-records whose hash key lies outside the shard's
            range, as the KCL does (the KPL re-sends records of an aggregate that reached the
            wrong shard after a reshard). Turn it off for producers that pack records of several
            shards into one aggregate (e.g. aws-kinesis-agg's RecordAggregator): they would lose
            records otherwise.
        retrieval: ``"polling"`` (GetRecords) or ``"fanout"`` (enhanced fan-out: a registered
            stream consumer, SubscribeToShard, 2 MiB/s per shard for this app alone, ~70 ms
            latency; extra AWS cost). Fan-out falls back to polling, with a warning, where it is
            unavailable.
        fanout_consumer_name: the stream consumer's name (default: the app name).
        prefetch_budget_bytes: the memory all prefetched and in-process batches of the process
            may hold together (estimated; see retrieval/budget.py). The largest value among the
            consumers of one process applies to all of them.
    """

    failover_time: float = 10.0
    renew_interval: float | None = None
    take_interval: float | None = None
    shard_sync_interval: float = 30.0
    idle_poll_interval: float = 1.0
    min_poll_interval: float = 0.2
    max_records: int = 10_000
    processor_max_attempts: int = 5
    processor_retry_base: float = 0.5
    processor_retry_cap: float = 30.0
    shutdown_timeout: float = 30.0
    max_leases: int | None = None
    read_quota_share: float = 1.0
    shard_read_calls_per_second: float = 5.0
    shard_read_bytes_per_second: int = 2 * 1024 * 1024
    prefetch_budget_bytes: int = 256 * 1024 * 1024
    drop_misrouted_subrecords: bool = True
    retrieval: str = "polling"
    fanout_consumer_name: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "failover_time",
            "shard_sync_interval",
            "idle_poll_interval",
            "min_poll_interval",
            "processor_retry_base",
            "processor_retry_cap",
            "shutdown_timeout",
            "shard_read_calls_per_second",
            "shard_read_bytes_per_second",
        ):
            _positive(name, getattr(self, name))
        for name in ("renew_interval", "take_interval"):
            value = getattr(self, name)
            if value is not None:
                _positive(name, value)
        if self.effective_renew_interval >= self.failover_time:
            raise ConfigError(
                f"renew_interval ({self.effective_renew_interval}) must be shorter than "
                f"failover_time ({self.failover_time}), or leases expire between renewals"
            )
        if not 1 <= self.max_records <= 10_000:
            raise ConfigError(
                f"max_records must be within 1..10000 (the GetRecords limit), got {self.max_records}"
            )
        if self.processor_max_attempts < 1:
            raise ConfigError(f"processor_max_attempts must be >= 1, got {self.processor_max_attempts}")
        if not 0 < self.read_quota_share <= 1:
            raise ConfigError(f"read_quota_share must be within (0, 1], got {self.read_quota_share!r}")
        if self.prefetch_budget_bytes < 1024 * 1024:
            raise ConfigError(
                f"prefetch_budget_bytes must be at least 1 MiB (1048576), got {self.prefetch_budget_bytes}"
            )
        if self.retrieval not in ("polling", "fanout"):
            raise ConfigError(f"retrieval must be 'polling' or 'fanout', got {self.retrieval!r}")
        if self.fanout_consumer_name is not None and not _CONSUMER_NAME.fullmatch(self.fanout_consumer_name):
            raise ConfigError(
                f"fanout_consumer_name {self.fanout_consumer_name!r} is not a valid stream consumer name "
                "(1-128 characters of a-z A-Z 0-9 _ . -)"
            )
        if self.max_leases is not None and self.max_leases < 1:
            raise ConfigError(f"max_leases must be >= 1 or None, got {self.max_leases}")

    @property
    def effective_renew_interval(self) -> float:
        return self.renew_interval if self.renew_interval is not None else self.failover_time / 3

    @property
    def effective_take_interval(self) -> float:
        return self.take_interval if self.take_interval is not None else self.failover_time / 3
