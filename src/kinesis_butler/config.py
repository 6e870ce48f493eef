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

__all__ = ["ConsumerConfig", "ProducerConfig", "default_worker_id", "env"]


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


_MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class ProducerConfig:
    """How a producer batches, aggregates and retries.

    The PutRecords limits (API reference, 2026-11): at most 500 entries per call; a record's data
    plus its partition key at most the stream's maximum record size (1 MiB by default, up to
    10 MiB after UpdateMaxRecordSize); a request at most 10 MiB including partition keys (older
    endpoints, and older docs, say 5 MiB: the default stays there).

    Attributes:
        linger: seconds a record may wait for others to fill a PutRecords call (KPL
            ``RecordMaxBufferedTime``, 100 ms).
        max_batch_records: entries per PutRecords call (1..500).
        max_request_bytes: bytes of data and partition keys per PutRecords call (up to 10 MiB).
        max_record_bytes: the stream's maximum record size: data + UTF-8 partition key (1 MiB by
            default; up to 10 MiB for streams raised with UpdateMaxRecordSize).
        max_buffered_records: records accepted but not yet written (or failed) before ``put``
            waits: the back-pressure bound.
        max_buffered_bytes: the same bound in bytes of data and partition keys.
        max_in_flight: concurrent PutRecords calls.
        ordered: keep each partition key's records in order across retries: at most one
            PutRecords entry (a record or an aggregate) per key is in flight or awaiting a retry.
            Without it a retried record, or a record in a concurrent call (``max_in_flight``
            > 1), may land after later records of its key.
        max_attempts: tries per entry before its records fail with ``RecordFailed``.
        retry_base: first retry delay in seconds (full jitter, doubled per attempt).
        retry_cap: the largest retry delay.
        aggregate: pack small records of one predicted shard into KPL aggregated records.
        aggregation_max_bytes: the most bytes of one aggregated record (KPL ``AggregationMaxSize``,
            51,200 B); larger records are sent as they are.
        shard_refresh_interval: the least seconds between two ListShards calls that refresh the
            hash key -> shard map after a record landed on an unexpected shard.
        spool_path: a SQLite file (one per stream, one producer at a time) where ``put`` commits
            each record before it returns; records leave it once PutRecords wrote them, and
            those left by a crash (even ``kill -9``) are sent first on the next start. ``None``:
            no spool, buffered records die with the process.
        spool_fsync: ``fsync`` the spool at every commit (SQLite ``synchronous=FULL``), so that
            accepted records survive a power loss or an OS crash too, not only a process crash.
    """

    linger: float = 0.1
    max_batch_records: int = 500
    max_request_bytes: int = 5 * _MIB
    max_record_bytes: int = _MIB
    max_buffered_records: int = 50_000
    max_buffered_bytes: int = 64 * _MIB
    max_in_flight: int = 8
    ordered: bool = False
    max_attempts: int = 10
    retry_base: float = 0.1
    retry_cap: float = 5.0
    aggregate: bool = True
    aggregation_max_bytes: int = 51_200
    shard_refresh_interval: float = 1.0
    spool_path: str | None = None
    spool_fsync: bool = False

    def __post_init__(self) -> None:
        if not self.linger >= 0:
            raise ConfigError(f"linger must be >= 0, got {self.linger!r}")
        for name in ("retry_base", "retry_cap", "shard_refresh_interval"):
            _positive(name, getattr(self, name))
        if not 1 <= self.max_batch_records <= 500:
            raise ConfigError(
                "max_batch_records must be within 1..500 (the PutRecords limit), "
                f"got {self.max_batch_records}"
            )
        if not 1024 <= self.max_record_bytes <= 10 * _MIB:
            raise ConfigError(
                f"max_record_bytes must be within 1024..10485760 (1 KiB..10 MiB), got {self.max_record_bytes}"
            )
        if not self.max_record_bytes <= self.max_request_bytes <= 10 * _MIB:
            raise ConfigError(
                f"max_request_bytes must be within max_record_bytes ({self.max_record_bytes})..10485760 "
                f"(the PutRecords limit), got {self.max_request_bytes}"
            )
        if self.max_buffered_records < 1:
            raise ConfigError(f"max_buffered_records must be >= 1, got {self.max_buffered_records}")
        if self.max_buffered_bytes < self.max_record_bytes:
            raise ConfigError(
                f"max_buffered_bytes must be >= max_record_bytes ({self.max_record_bytes}), "
                f"got {self.max_buffered_bytes}"
            )
        if self.max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.spool_path is not None and not self.spool_path:
            raise ConfigError("spool_path must be a file path, or None for no spool")
        if not 256 <= self.aggregation_max_bytes <= self.max_record_bytes:
            raise ConfigError(
                f"aggregation_max_bytes must be within 256..max_record_bytes ({self.max_record_bytes}), "
                f"got {self.aggregation_max_bytes}"
            )
