"""Bearer-token authentication for the inference services (cbam.v1 and the Open Inference Protocol);
health and reflection stay open, so load balancers and grpcurl work without a token."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable

import grpc

from server.interceptors import HandlerInterceptor, rebuild

__all__ = ["BearerTokenInterceptor"]

# One message whatever was wrong: a caller learns nothing about why its token failed.
REFUSAL = 'missing or wrong "authorization: Bearer <token>" metadata'


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class BearerTokenInterceptor(HandlerInterceptor):
    """Answers UNAUTHENTICATED to calls of ``services`` without "authorization: Bearer <token>"."""

    def __init__(
        self,
        tokens: Iterable[str],
        services: Iterable[str],
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        """``on_refusal(method)`` is called for each refused call, with the bare method name."""
        self._digests = [_digest(token) for token in tokens]
        self._prefixes = tuple(f"/{service}/" for service in services)
        self._on_refusal = on_refusal

    def handler_for(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if not details.method.startswith(self._prefixes) or self._authorized(details):
            return handler
        method = details.method.rpartition("/")[2]
        return _refusal(handler, lambda: self._on_refusal and self._on_refusal(method))

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if isinstance(given, bytes):
            given = given.decode("latin-1")
        scheme, _, token = given.partition(" ")
        well_formed = scheme.lower() == "bearer" and token != "" and not any(c.isspace() for c in token)
        # Compare digests (all the same length) with every token, match or not, in constant time:
        # how long this takes says nothing about which token, or how much of one, was right.
        presented = _digest(token if well_formed else "")
        matches = [hmac.compare_digest(presented, digest) for digest in self._digests]
        return well_formed and any(matches)


def _refusal(handler: grpc.RpcMethodHandler, count: Callable[[], object]) -> grpc.RpcMethodHandler:
    async def refuse(request, context: grpc.aio.ServicerContext) -> None:
        count()
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)

    # No request deserialiser: a caller without a token does not get its message parsed.
    return rebuild(handler, refuse, request_deserializer=None)
