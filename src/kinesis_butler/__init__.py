"""kinesis-butler: consume Amazon Kinesis Data Streams with many workers, without the JVM.

The public surface is what ``__all__`` lists; everything else is private and may change.
"""

from kinesis_butler.config import ConsumerConfig, ProducerConfig
from kinesis_butler.consumer import AsyncConsumer, ShardStatus
from kinesis_butler.errors import (
    AccessDenied,
    AwsError,
    ButlerError,
    CheckpointError,
    ClosedError,
    ConfigError,
    CredentialsError,
    EndpointUnreachable,
    ExpiredIterator,
    LeaseLost,
    ProcessorFailed,
    ProcessorImportError,
    RecordFailed,
    RecordRejected,
    ResourceNotFound,
    StaleLease,
    StoreError,
    StoreUnavailable,
    Throttled,
)
from kinesis_butler.models import ExtendedSequenceNumber, InitialPosition, Lease, Record, Shard, StartPosition
from kinesis_butler.parallel import ordered_parallel
from kinesis_butler.processor import (
    Checkpointer,
    InitializationInput,
    LeaseLostInput,
    ProcessRecordsInput,
    RecordProcessor,
    RecordProcessorBase,
    ShardEndedInput,
    ShutdownRequestedInput,
)
from kinesis_butler.producer import AsyncProducer, PutHandle, PutResult
from kinesis_butler.stores import LeaseStore, open_store
from kinesis_butler.sync import Consumer, Producer

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "AsyncConsumer",
    "AsyncProducer",
    "AwsError",
    "ButlerError",
    "CheckpointError",
    "Checkpointer",
    "ClosedError",
    "ConfigError",
    "Consumer",
    "ConsumerConfig",
    "CredentialsError",
    "EndpointUnreachable",
    "ExpiredIterator",
    "ExtendedSequenceNumber",
    "InitialPosition",
    "InitializationInput",
    "Lease",
    "LeaseLost",
    "LeaseLostInput",
    "LeaseStore",
    "ProcessRecordsInput",
    "ProcessorFailed",
    "ProcessorImportError",
    "Producer",
    "ProducerConfig",
    "PutHandle",
    "PutResult",
    "Record",
    "RecordFailed",
    "RecordProcessor",
    "RecordProcessorBase",
    "RecordRejected",
    "ResourceNotFound",
    "Shard",
    "ShardEndedInput",
    "ShardStatus",
    "ShutdownRequestedInput",
    "StaleLease",
    "StartPosition",
    "StoreError",
    "StoreUnavailable",
    "Throttled",
    "__version__",
    "open_store",
    "ordered_parallel",
]
