"""Every exception kinesis-butler raises.

One root, so ``except ButlerError`` catches everything of ours. Each class says whether
retrying the same call may succeed (``retriable``); the transport and the shard loops use
that flag rather than lists of types.

::

    ButlerError
    ├── ConfigError                   bad configuration or user input (never retriable)
    │   ├── ProcessorImportError      a ``pkg.module:func`` path that does not import
    │   └── RecordRejected            a producer's ``put`` refused a record (size, keys)
    ├── AwsError                      an AWS API call failed (carries operation, code, request id)
    │   ├── ResourceNotFound          stream / shard / table does not exist
    │   ├── ResourceInUse             stream is being created, deleted or resharded
    │   ├── InvalidArgument           the request is malformed
    │   ├── AccessDenied              credentials lack permission (or are missing, see CredentialsError)
    │   ├── ExpiredIterator           the shard iterator is older than 5 minutes       (retriable)
    │   ├── Throttled                 ProvisionedThroughputExceeded, LimitExceeded, ... (retriable)
    │   ├── ServiceUnavailable        5xx from the service                              (retriable)
    │   ├── ConditionalCheckFailed    a DynamoDB conditional write lost
    │   ├── RecordFailed              a produced record was not written (its entry's error code)
    │   └── EventStreamError          a SubscribeToShard event stream was malformed or cut short (retriable)
    ├── EndpointUnreachable           could not connect / timed out (retriable)
    │   └── ConnectionLost            an open connection or stream broke: RST_STREAM, GOAWAY, EOF (retriable)
    ├── CredentialsError              no credentials were found in the botocore chain
    ├── StoreError                    the lease store failed
    │   ├── StoreUnavailable          could not reach the store (retriable)
    │   └── StoreSchemaError          the store holds a table of a foreign schema
    ├── LeaseError
    │   ├── StaleLease                a fenced write lost: the lease counter moved on (lease key, counter)
    │   └── LeaseLost                 this worker no longer holds the lease; checkpoint refused
    ├── CheckpointError               a checkpoint was invalid (goes backwards, unknown sequence)
    ├── ProcessorFailed               the user's processor kept raising; the shard was stopped
    └── ClosedError                   the consumer / client was closed and cannot be reused
"""

from __future__ import annotations


class ButlerError(Exception):
    """Root of every kinesis-butler error."""

    retriable: bool = False


class ConfigError(ButlerError):
    """Configuration or user input is invalid. The message names the field and the fix."""


class ProcessorImportError(ConfigError):
    """A processor path like ``pkg.module:func`` could not be imported."""


class RecordRejected(ConfigError):
    """A producer refused a record at ``put``: too large, a partition key that is empty or over
    256 characters, an invalid explicit hash key, data that is not bytes. Nothing else is lost."""


class AwsError(ButlerError):
    """An AWS API call failed.

    Attributes:
        operation: the API operation, e.g. ``GetRecords``.
        code: the short error code from ``__type`` (``ResourceNotFoundException``).
        request_id: the ``x-amzn-RequestId`` of the failed call, when known.
        status: the HTTP status.
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str = "",
        code: str = "",
        request_id: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.operation = operation
        self.code = code
        self.request_id = request_id
        self.status = status
        self.body: bytes | None = None  # the raw error response, for callers that need details

    def __str__(self) -> str:
        parts = [self.message]
        if self.operation or self.code:
            parts.append(f"({self.operation} {self.code})".replace("( ", "(").replace(" )", ")"))
        if self.request_id:
            parts.append(f"[request id {self.request_id}]")
        return " ".join(parts)


class ResourceNotFound(AwsError):
    """The stream, shard, consumer or table does not exist."""


class ResourceInUse(AwsError):
    """The resource is busy (creating, deleting, resharding)."""


class InvalidArgument(AwsError):
    """The request was rejected as malformed."""


class AccessDenied(AwsError):
    """The credentials are not allowed to do this."""


class RecordFailed(AwsError):
    """A produced record was not written: a PutRecords entry failed with a non-retriable error
    code, or its retries ran out. ``code`` is the entry's ``ErrorCode``; ``attempts`` the tries."""

    def __init__(self, message: str, *, code: str, attempts: int) -> None:
        super().__init__(message, operation="PutRecords", code=code)
        self.attempts = attempts


class ExpiredIterator(AwsError):
    """The shard iterator expired; get a new one from the last delivered sequence number."""

    retriable = True


class Throttled(AwsError):
    """A quota was exceeded (ProvisionedThroughputExceeded, LimitExceeded, ThrottlingException)."""

    retriable = True


class ServiceUnavailable(AwsError):
    """The service answered with a 5xx status."""

    retriable = True


class ConditionalCheckFailed(AwsError):
    """A DynamoDB conditional write found the item changed."""


class EventStreamError(AwsError):
    """An event stream (``application/vnd.amazon.eventstream``) was malformed or ended mid-message.

    Retriable: resubscribing from the last continuation sequence number loses nothing.
    """

    retriable = True


class EndpointUnreachable(ButlerError):
    """The endpoint could not be reached (connection refused, DNS, timeout)."""

    retriable = True


class ConnectionLost(EndpointUnreachable):
    """An established connection or stream broke: reset by the server, GOAWAY, EOF, or silence."""


class CredentialsError(ButlerError):
    """No AWS credentials were found."""


class StoreError(ButlerError):
    """The lease store failed."""


class StoreUnavailable(StoreError):
    """The lease store cannot be reached right now."""

    retriable = True


class StoreSchemaError(StoreError):
    """The lease store holds a table with a schema that is not ours."""


class LeaseError(ButlerError):
    """Base of lease ownership errors. ``lease_key`` names the lease."""

    def __init__(self, message: str, *, lease_key: str) -> None:
        super().__init__(message)
        self.lease_key = lease_key


class StaleLease(LeaseError):
    """A fenced write lost: the stored lease counter is not the one the writer last saw."""

    def __init__(self, message: str, *, lease_key: str, expected_counter: int | None = None) -> None:
        super().__init__(message, lease_key=lease_key)
        self.expected_counter = expected_counter


class LeaseLost(LeaseError):
    """This worker does not hold the lease any more; the checkpoint was refused."""


class CheckpointError(ButlerError):
    """A checkpoint request was invalid (it goes backwards or names a record never delivered)."""


class ProcessorFailed(ButlerError):
    """The processor raised on the same batch too many times; the shard was stopped."""

    def __init__(self, message: str, *, shard_id: str, attempts: int) -> None:
        super().__init__(message)
        self.shard_id = shard_id
        self.attempts = attempts


class ClosedError(ButlerError):
    """The object was closed and cannot be used again."""
