"""Errors that domain code raises and the server runtime turns into gRPC statuses.

Domain code stays free of gRPC: it raises one of these with a message that names the field or the
resource, and `libs.server` aborts the RPC with the matching status code. Errors about a field also carry
it as a structured detail (`google.rpc.BadRequest` field violations in `grpc-status-details-bin`, read with
grpcio-status), so callers and the edge read the field instead of parsing the message.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

# Client values echoed in messages are cut to this many characters. Status messages and metadata values
# travel as HTTP/2 headers on a connection the edge shares between many clients' requests: an unbounded
# one (a 64 KB model name) overflows the peer's header limit and the whole connection is dropped, failing
# every other request on it.
MAX_SHOWN_CHARS = 200
MAX_STATUS_MESSAGE_CHARS = 1024
MAX_METADATA_VALUE_CHARS = 1024


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def shown(value: Any) -> str:
    """A client-supplied value as an error message quotes it: its repr, cut to MAX_SHOWN_CHARS."""
    if isinstance(value, str) and len(value) > MAX_SHOWN_CHARS:
        value = value[:MAX_SHOWN_CHARS]  # never repr a huge string only to cut it
        return repr(value)[:-1] + "…" + repr(value)[-1]
    return _bounded(repr(value), MAX_SHOWN_CHARS)


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        message = _bounded(message, MAX_STATUS_MESSAGE_CHARS)
        super().__init__(message)
        self.message = message
        # Extra trailing metadata for the client, e.g. ("retry-after", "3").
        self.trailers = bounded_metadata(trailers)

    def details(self) -> list[Message]:
        """Structured details sent with the status (google.rpc error_details messages)."""
        return []


def bounded_metadata(metadata: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """Metadata with every text value cut to MAX_METADATA_VALUE_CHARS (binary -bin values pass)."""
    return tuple(
        (key, _bounded(value, MAX_METADATA_VALUE_CHARS) if isinstance(value, str) else value)
        for key, value in metadata
    )


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = _bounded(field, MAX_SHOWN_CHARS)
        self.problem = _bounded(problem, MAX_STATUS_MESSAGE_CHARS)

    def details(self) -> list[Message]:
        violation = error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.problem)
        return [error_details_pb2.BadRequest(field_violations=[violation])]


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


STATUS_DETAILS_KEY = "grpc-status-details-bin"


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """(field, description) of each BadRequest field violation a failed call's status carries."""
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    encoded = next((value for key, value in (trailers or ()) if key == STATUS_DETAILS_KEY), None)
    if not isinstance(encoded, bytes):
        return []
    status = status_pb2.Status()
    try:
        status.ParseFromString(encoded)
    except DecodeError:
        return []
    violations: list[tuple[str, str]] = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            violations += [(v.field, v.description) for v in bad_request.field_violations]
    return violations
