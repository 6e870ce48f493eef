"""AWS JSON-protocol error answers: the short ``__type`` codes, and the typed error each raises."""

from __future__ import annotations

from typing import Final

import msgspec

from kinesis_butler.errors import (
    AccessDenied,
    AwsError,
    ConditionalCheckFailed,
    ExpiredIterator,
    InvalidArgument,
    ResourceInUse,
    ResourceNotFound,
    ServiceUnavailable,
    Throttled,
)

__all__ = ["ERROR_CODES", "error_from_response"]

#: The short ``__type`` codes and the error each one raises. Unknown codes raise ``AwsError``
#: (or ``ServiceUnavailable`` with a 5xx status).
ERROR_CODES: Final[dict[str, type[AwsError]]] = {
    "ResourceNotFoundException": ResourceNotFound,
    "ResourceInUseException": ResourceInUse,
    "InvalidArgumentException": InvalidArgument,
    "ValidationException": InvalidArgument,
    "SerializationException": InvalidArgument,
    "AccessDeniedException": AccessDenied,
    "UnrecognizedClientException": AccessDenied,
    "InvalidSignatureException": AccessDenied,
    "ExpiredTokenException": AccessDenied,
    "IncompleteSignature": AccessDenied,
    "ExpiredIteratorException": ExpiredIterator,
    "ProvisionedThroughputExceededException": Throttled,
    "LimitExceededException": Throttled,
    "ThrottlingException": Throttled,
    "KMSThrottlingException": Throttled,
    "RequestLimitExceeded": Throttled,
    "ConditionalCheckFailedException": ConditionalCheckFailed,
}


class _ErrorBody(msgspec.Struct):
    # AWS JSON errors spell the message both ways depending on the service.
    type: str | None = msgspec.field(default=None, name="__type")
    message: str | None = None
    Message: str | None = None


_error_decoder: Final = msgspec.json.Decoder(_ErrorBody)


def error_from_response(
    operation: str, status: int, body: bytes, request_id: str | None, error_type_header: str | None = None
) -> AwsError:
    """Build the typed error for a non-2xx answer.

    Args:
        operation: the API operation, e.g. ``GetRecords``.
        status: the HTTP status.
        body: the response body (JSON, or anything a proxy sent).
        request_id: the ``x-amzn-RequestId`` header.
        error_type_header: the ``x-amzn-ErrorType`` header, used when the body has no ``__type``.

    Returns:
        An instance of the mapped :class:`AwsError` subclass.
    """
    code = ""
    message = ""
    try:
        parsed = _error_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        snippet = body[:200].decode("utf-8", "replace").strip()
        message = f"HTTP {status} with a non-JSON body: {snippet!r}" if snippet else f"HTTP {status}"
    else:
        code = parsed.type or ""
        message = parsed.message or parsed.Message or ""
    if not code and error_type_header:
        code = error_type_header.split(":", 1)[0]
    # "com.amazonaws.kinesis.v20131202#ResourceNotFoundException" -> "ResourceNotFoundException"
    code = code.rsplit("#", 1)[-1]
    cls = ERROR_CODES.get(code)
    if cls is None:
        cls = ServiceUnavailable if status >= 500 else AwsError
    error = cls(
        message or code or f"HTTP {status}",
        operation=operation,
        code=code,
        request_id=request_id,
        status=status,
    )
    # Kept for callers that read more than the message (DynamoDB's ALL_OLD item on a failed
    # condition); never part of str(error), so nothing from it reaches logs by accident.
    error.body = body
    return error
