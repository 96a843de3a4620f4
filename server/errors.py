"""The few ways a request can fail short of a bug. ``calls.py`` alone turns them into gRPC statuses.

    CbamError
     ├── InvalidInput      the request itself is wrong            INVALID_ARGUMENT
     │    └── TooLarge     ... because it is over a size limit    RESOURCE_EXHAUSTED
     ├── Overloaded        the queue is full                      RESOURCE_EXHAUSTED
     ├── OutOfMemory       one image alone does not fit on the device RESOURCE_EXHAUSTED
     ├── Expired           its deadline passed before compute     DEADLINE_EXCEEDED
     ├── ShuttingDown      the server is draining                 UNAVAILABLE
     ├── NotReady          the model is still warming up          UNAVAILABLE
     ├── NotFound          it names a model or version not served NOT_FOUND
     └── Unsupported       it asks for something not implemented  UNIMPLEMENTED

``StartupError`` is apart: a setting that looked valid but cannot be served (float16 on a CPU,
an unknown architecture). It names the field, and ``cbam-serve`` exits with status 2.
"""

from __future__ import annotations

__all__ = [
    "CbamError",
    "Expired",
    "InvalidInput",
    "NotFound",
    "NotReady",
    "OutOfMemory",
    "Overloaded",
    "ShuttingDown",
    "StartupError",
    "TooLarge",
    "Unsupported",
]


class CbamError(Exception):
    """Base of the errors a request can end with; the message is sent to the caller."""


class InvalidInput(CbamError):
    """The request is malformed: undecodable image, bad tensor, top_k out of range..."""


class TooLarge(InvalidInput):
    """The request is over a size limit (image pixels)."""


class Overloaded(CbamError):
    """The batch queue is full; the caller may retry later."""


class OutOfMemory(CbamError):
    """The device ran out of memory even for a batch of one."""


class Expired(CbamError):
    """The request's deadline passed before it could be computed."""


class ShuttingDown(CbamError):
    """The server is draining and takes no new work."""


class NotReady(CbamError):
    """The model is not ready yet (it is warming up); the caller may retry shortly."""


class NotFound(CbamError):
    """The request names a model or version this server does not serve."""


class Unsupported(CbamError):
    """The request asks for a feature this server does not implement; the message says which."""


class StartupError(Exception):
    """A setting that cannot be served on this machine; ``field`` is its dotted name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
