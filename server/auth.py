"""Bearer-token authentication for cbam.v1.InferenceService (health and reflection stay open, so
load balancers and grpcurl work without a token)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable

import grpc

__all__ = ["BearerTokenInterceptor"]


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED to calls of ``service`` without "authorization: Bearer <token>"."""

    def __init__(self, tokens: Iterable[str], service: str) -> None:
        self._accepted = [f"Bearer {token}".encode() for token in tokens]
        self._prefix = f"/{service}/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefix) or self._authorized(details):
            return handler
        return _refusal(handler)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else given
        # Compare against every token in constant time, so timing reveals nothing about them.
        return any([hmac.compare_digest(given_bytes, token) for token in self._accepted])


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, 'missing or wrong "authorization: Bearer" token')

    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
