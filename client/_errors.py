"""The exceptions the client raises. Every one carries the gRPC status code and the server's message.

    CbamError                    any failed call or stream item (.code, .message)
    ├── InvalidArgumentError     INVALID_ARGUMENT, OUT_OF_RANGE: the request was wrong; never retried
    ├── UnavailableError         UNAVAILABLE: no server reachable (retried)
    ├── OverloadedError          RESOURCE_EXHAUSTED: the server's queue is full (retried)
    ├── DeadlineExceededError    DEADLINE_EXCEEDED: the call's deadline passed
    └── AuthenticationError      UNAUTHENTICATED, PERMISSION_DENIED: a missing or wrong token or certificate
"""

from __future__ import annotations

import grpc

__all__ = [
    "AuthenticationError",
    "CbamError",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "OverloadedError",
    "UnavailableError",
    "error_from_code",
    "error_from_rpc",
    "item_error",
]


class CbamError(Exception):
    """A call (or one stream item) failed. `code` is the grpc.StatusCode, `message` the server's words."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgumentError(CbamError):
    """The server rejected the request itself (bad image, unknown block, top_k too large)."""


class UnavailableError(CbamError):
    """No server could be reached, or it is shutting down."""


class OverloadedError(CbamError):
    """The server's batching queue is full."""


class DeadlineExceededError(CbamError):
    """The call's deadline passed before a result came back."""


class AuthenticationError(CbamError):
    """The server wants a (different) bearer token or client certificate."""


_BY_CODE: dict[grpc.StatusCode, type[CbamError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
}
_CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def error_from_code(code: grpc.StatusCode | int, message: str) -> CbamError:
    """The exception for a status code (a grpc.StatusCode or its number, as in a stream's ItemError)."""
    if not isinstance(code, grpc.StatusCode):
        code = _CODE_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, CbamError)(code, message)


def item_error(answer) -> CbamError | None:
    """The exception carried by one stream or batch answer (a ClassifyStreamResponse), or None."""
    if answer.WhichOneof("outcome") != "error":
        return None
    return error_from_code(answer.error.code, answer.error.message)


def error_from_rpc(exc: grpc.RpcError) -> CbamError:
    """The exception for a failed RPC (sync grpc.RpcError or grpc.aio.AioRpcError)."""
    return error_from_code(exc.code(), exc.details() or "")
