"""gRPC server interceptors: bearer-token authentication, and INVALID_ARGUMENT for requests that do not parse."""

from __future__ import annotations

import hmac

import grpc
from google.protobuf.message import DecodeError


class TokenAuth(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>`, except health checks (probes carry no token)."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if details.method.startswith("/grpc.health.v1.Health/") or handler is None:
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        # In constant time: how long `==` takes tells how many leading characters of a guess are right.
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self.expected):
            return handler

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong authorization token")
        return _handler_like(handler, deny, handler.request_deserializer)


class _BadMessage:
    """A request that did not parse, handed to the handler in place of the message."""

    def __init__(self, error: str):
        self.error = error


class ParseErrors(grpc.aio.ServerInterceptor):
    """A Nexus request that does not parse (a string field that is not UTF-8, a corrupt message) gets
    INVALID_ARGUMENT naming why, where gRPC would answer INTERNAL "Exception deserializing request!"."""

    def __init__(self, service_name: str):
        self.prefix = f"/{service_name}/"  # the service whose requests this guards

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        parse = handler.request_deserializer
        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary

        def tolerant(data: bytes):
            try:
                return parse(data)
            except DecodeError as e:
                return _BadMessage(str(e))

        async def guarded(request, context):
            if isinstance(request, _BadMessage):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}")
            return await behavior(request, context)
        return _handler_like(handler, guarded, tolerant)


def _handler_like(handler: grpc.RpcMethodHandler, behavior, request_deserializer) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary or server streaming) and response type as `handler`."""
    make = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
    return make(behavior, request_deserializer=request_deserializer, response_serializer=handler.response_serializer)
