"""A small Python client of the nexus-jax gRPC server.

    async with Client("127.0.0.1:50051") as c:
        async for r in c.generate("Hello", max_tokens=16):
            if r.WhichOneof("response") == "chunk": print(r.chunk.text, end="")

`generate_sync` is the blocking convenience: it returns the final Complete message of each completion.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus_jax.server.proto import nexus_pb2 as pb
from nexus_jax.server.proto import nexus_pb2_grpc as pb_grpc

_REPEATED = ("stop", "stop_token_ids")


def request(prompt: str | Sequence[int], *, request_id: str = "", program_id: str = "", thread_id: str = "",
            priority: int = 0, **sampling: Any) -> pb.GenerateRequest:
    """A GenerateRequest: text or token ids, and SamplingParams fields by name (unset ones keep the defaults)."""
    params = pb.SamplingParams()
    for name, value in sampling.items():
        if value is None:
            continue
        if name in _REPEATED:
            getattr(params, name).extend([value] if isinstance(value, str) else value)
        elif name in pb.SamplingParams.DESCRIPTOR.fields_by_name:
            setattr(params, name, value)
        else:
            raise TypeError(f"unknown sampling parameter {name!r}")
    msg = pb.GenerateRequest(request_id=request_id, sampling_params=params, program_id=program_id,
                             thread_id=thread_id, priority=priority)
    if isinstance(prompt, str):
        msg.text = prompt
    else:
        msg.token_ids.SetInParent()  # an empty list still selects token_ids (and the server says it is empty)
        msg.token_ids.ids.extend(prompt)
    return msg


class Client:
    """Connects to `target` ("host:port"). token: the server's auth token. tls: False, True (system roots) or
    the path of a PEM root certificate."""

    def __init__(self, target: str, token: str | None = None, tls: bool | str = False,
                 max_message_bytes: int = 64 * 1024 * 1024):
        # A connection of its own (gRPC shares one between a process's channels to a target by default): the
        # server scopes request ids by connection, so each Client is a client of its own there.
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes), ("grpc.use_local_subchannel_pool", 1)]
        if tls:
            root = None
            if isinstance(tls, str):
                with open(tls, "rb") as f:
                    root = f.read()
            self.channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root), options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.stub = pb_grpc.NexusStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None,
                       **kwargs: Any) -> AsyncIterator[pb.GenerateResponse]:
        """Streams the responses: chunks of new tokens, then a Complete per completion (or an Error). Leaving
        the loop early cancels the call, which aborts the request on the server."""
        call = self.stub.Generate(request(prompt, **kwargs), timeout=timeout, metadata=self.metadata)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def abort(self, request_id: str) -> bool:
        return (await self.stub.Abort(pb.AbortRequest(request_id=request_id), metadata=self.metadata)).found

    async def server_info(self) -> pb.ServerInfo:
        return await self.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=self.metadata)

    async def model_info(self) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata)

    async def start_session(self, program_id: str = "") -> pb.StartSessionResponse:
        return await self.stub.StartSession(pb.StartSessionRequest(program_id=program_id), metadata=self.metadata)

    async def end_session(self, session_id: str) -> bool:
        return (await self.stub.EndSession(pb.EndSessionRequest(session_id=session_id),
                                           metadata=self.metadata)).found

    async def health(self, service: str = "") -> str:
        """"SERVING", "NOT_SERVING", ... of the server (service "") or of one service."""
        response = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def generate_sync(target: str, prompt: str | Sequence[int], *, token: str | None = None, tls: bool | str = False,
                  timeout: float | None = None, **kwargs: Any) -> list[pb.Complete]:
    """Blocking: runs one request to the end and returns its Complete messages in completion order."""

    async def run() -> list[pb.Complete]:
        async with Client(target, token, tls) as client:
            done = []
            async for r in client.generate(prompt, timeout=timeout, **kwargs):
                if r.WhichOneof("response") == "error":
                    raise RuntimeError(f"request failed on the server: {r.error.message}")
                if r.WhichOneof("response") == "complete":
                    done.append(r.complete)
            return sorted(done, key=lambda c: c.index)

    return asyncio.run(run())
