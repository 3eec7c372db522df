"""The gRPC server (grpc.aio) over one `AsyncLLM` or a `ReplicatedAsyncLLM` of several engine replicas: nexus.v1.Nexus,
grpc.health.v1.Health and reflection.

Each Generate stream owns one engine request. However the stream ends (the client cancels or disconnects, its
deadline passes, the server shuts down) the handler closes the AsyncLLM stream, which aborts the request and frees
its KV blocks. Models come only from the server's own configuration; a request names none (GenerateRequest has
no such field). Admission: a request is accepted only while fewer than max_in_flight streams are open, and a
stream stays open until its request ends, so the engine's queue (running and waiting) holds at most max_in_flight
requests of at most max_n sequences each; the rest get RESOURCE_EXHAUSTED with a retry-after-ms hint.

A request belongs to the client that sent it, and a client is one connection (the peer gRPC reports: its
address and port), the identity no other caller can take: every client holds the same bearer token, so the
token tells none apart. Request ids are scoped by client: Abort finds only the requests sent on its own
connection, ALREADY_EXISTS only answers a client that reuses one of its own ids in flight, and two clients may use
the same id at once. The engine runs each request under an id of the server's own (random, never shown), and
an id the server makes for a request that brings none is random too (128 bits), so no id can be guessed.

Over replicas, Generate and Abort go through the front end's router, ServerInfo and the metrics add up the live
replicas' levels, and sessions open their program's record on every replica (server_sessions.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nexus_jax.core.outputs import RequestOutput
from nexus_jax.core.request import check_id_length
from nexus_jax.entrypoints.async_llm import AsyncLLM, EngineDeadError
from nexus_jax.server.grpc_requests import prompt_of, sampling_params
from nexus_jax.server.interceptors import ParseErrors, TokenAuth
from nexus_jax.server.metrics import EngineMetrics, replica_stats, replicas_of, totals
from nexus_jax.server.options import ServerOptions, check_limits, prompt_limit
from nexus_jax.server.proto import nexus_pb2 as pb
from nexus_jax.server.proto import nexus_pb2_grpc as pb_grpc
from nexus_jax.server.sessions import SessionLimitError, Sessions

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Nexus"].full_name
VERSION = "0.1.0"
RETRY_AFTER_KEY = "retry-after-ms"
log = logging.getLogger(__name__)


class NexusServicer(pb_grpc.NexusServicer):
    def __init__(self, llm: AsyncLLM, options: ServerOptions, metrics: EngineMetrics):
        """`llm`: an AsyncLLM or a front end over replicas (ReplicatedAsyncLLM)."""
        self.llm = llm
        self.options = options
        self.metrics = metrics
        # Open Generate streams: (client, the client's request id) -> the engine's request id.
        self.streams: dict[tuple[str, str], str] = {}
        self.sessions = Sessions(replicas_of(llm), options.max_sessions)
        self.started = time.monotonic()

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        if len(self.streams) >= self.options.max_in_flight:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{len(self.streams)} requests in flight, the server's limit; retry later",
                                trailing_metadata=((RETRY_AFTER_KEY, str(self.options.retry_after_ms)),))
        await self._check_ids(context, request_id=request.request_id, program_id=request.program_id,
                              thread_id=request.thread_id)
        rid = request.request_id or f"grpc-{uuid.uuid4().hex}"
        key, engine_id = (context.peer(), rid), uuid.uuid4().hex
        try:
            params = sampling_params(request.sampling_params, self.options.max_tokens_limit)
            prompt = await self._prompt(request)
            check_limits(self.options, prompt, params)
            stream = self.llm.generate(prompt, params, engine_id, priority=request.priority,
                                       program_id=request.program_id or None, thread_id=request.thread_id)
        except (ValueError, TypeError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if key in self.streams:  # checked after the prompt's encoding, which awaits: no id can slip in after it
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id {rid!r} is already in use")
        self.streams[key] = engine_id
        failure: tuple[grpc.StatusCode, str] | None = None
        try:
            failure = await self._relay(request, rid, stream, context)
        finally:
            del self.streams[key]
            await stream.aclose()  # a stream left early (cancel, deadline, disconnect) aborts its request here
        if failure is not None and failure[0] == grpc.StatusCode.DEADLINE_EXCEEDED:
            # The timed-out write is still queued in gRPC's core, which then refuses abort()'s status; the status
            # set here goes out after it, should the client read again.
            log.warning("request %.64s: %s", rid, failure[1])
            context.set_code(failure[0])
            context.set_details(failure[1])
            return
        if failure is not None:
            await context.abort(*failure)

    async def _prompt(self, request: pb.GenerateRequest) -> str | dict[str, Any]:
        """prompt_of, with text and chat encoded on a worker thread: a long text would otherwise stall every other
        call, health checks included."""
        limit = prompt_limit(self.options, self.llm.engine.max_model_len)
        tokenizer = self.llm.engine.tokenizer
        if request.WhichOneof("input") == "token_ids" or tokenizer is None:
            return prompt_of(request, tokenizer, limit)
        return await asyncio.to_thread(prompt_of, request, tokenizer, limit)

    async def _relay(self, request: pb.GenerateRequest, rid: str, stream, context) -> tuple | None:
        """Writes the stream's chunks and completions; returns the status to end with when the input was bad. A
        request that ends without its last output (the client cancelled, went away, stopped reading or ran out of
        time) is counted as aborted: Generate's aclose aborts it in the engine, whose output nobody reads."""
        ids: dict[int, list[int]] = {}
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, list] = {}
        counted = False
        try:
            async for out in stream:
                for c in out.outputs:
                    ids.setdefault(c.index, []).extend(c.token_ids)
                    texts.setdefault(c.index, []).append(c.text)
                    if c.logprobs:
                        logprobs.setdefault(c.index, []).extend(c.logprobs[:len(c.token_ids)])
                    if c.token_ids or c.text:
                        await self._write(context, pb.GenerateResponse(request_id=rid, chunk=pb.Chunk(
                            index=c.index, token_ids=c.token_ids, text=c.text)))
                if out.finished:  # out holds the last deltas; the metrics count whole completions
                    counted = True
                    self.metrics.observe(dataclasses.replace(out, outputs=[
                        dataclasses.replace(c, token_ids=ids[c.index]) for c in out.outputs]))
                    if out.error is not None:
                        await self._write(context, pb.GenerateResponse(request_id=rid,
                                                                       error=pb.Error(message=out.error)))
                        return None
                    for c in out.outputs:
                        complete = _complete(request, out, c, ids[c.index], "".join(texts[c.index]),
                                             logprobs.get(c.index))
                        if c.index == 0:  # one prompt, so its log-probs once
                            _add_logprobs(complete.prompt_logprobs, out.prompt_logprobs or ())
                        await self._write(context, pb.GenerateResponse(request_id=rid, complete=complete))
        except (ValueError, TypeError) as e:  # validation runs on the stream's first step
            counted = True  # refused: never a request
            return grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except EngineDeadError as e:
            counted = True  # no engine to have finished or aborted it
            return grpc.StatusCode.UNAVAILABLE, str(e)
        except grpc.aio.InternalError:  # a write the transport refused: the client disconnected or cancelled
            log.info("request %.64s: the client went away; the request was aborted", rid)
            return None
        except TimeoutError:
            return (grpc.StatusCode.DEADLINE_EXCEEDED, f"the client read nothing for "
                    f"{self.options.write_timeout_s} s (the server's write_timeout_s); the request was aborted")
        finally:
            if not counted:
                self.metrics.aborted(request.sampling_params.n or 1)
        return None

    async def _write(self, context: grpc.aio.ServicerContext, response: pb.GenerateResponse) -> None:
        """context.write, given up after write_timeout_s: a client that stops reading must not hold its request
        and admission slot until it disconnects."""
        async with asyncio.timeout(self.options.write_timeout_s):  # no task per write, unlike wait_for
            await context.write(response)

    async def _check_ids(self, context: grpc.aio.ServicerContext, **ids: str) -> None:
        """INVALID_ARGUMENT naming max_id_length for an id longer than it."""
        try:
            for name, value in ids.items():
                check_id_length(name, value, self.options.max_id_length, "max_id_length")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        """Aborts one of the calling client's own requests; another client's id is not found, as an unknown one."""
        await self._check_ids(context, request_id=request.request_id)
        engine_id = self.streams.get((context.peer(), request.request_id))
        if engine_id is not None:
            self.llm.abort(engine_id)
        return pb.AbortResponse(found=engine_id is not None)

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        engine = self.llm.engine
        return pb.ModelInfo(model=self.options.model_name, dtype=str(getattr(engine.executor, "dtype", "")),
                            max_model_len=engine.max_model_len, vocab_size=engine.vocab_size,
                            eos_token_ids=list(engine.eos_token_ids), has_tokenizer=engine.tokenizer is not None,
                            block_size=engine.executor.block_size, num_kv_blocks=engine.executor.num_blocks)

    async def GetServerInfo(self, request, context) -> pb.ServerInfo:
        """Levels summed over the live replicas (KV use: their mean; SM split: their distinct splits). The
        message has no replica count; the metrics have one series per replica."""
        t = totals(replica_stats(self.llm))
        num_sessions = await self._on_engines(self.sessions.count(), context)
        return pb.ServerInfo(num_running=t.running, num_waiting=t.waiting, kv_cache_usage=t.kv_usage,
                             num_in_flight=len(self.streams), max_in_flight=self.options.max_in_flight,
                             num_preemptions=t.num_preemptions, sm_split=",".join(t.splits),
                             uptime_s=time.monotonic() - self.started, num_sessions=num_sessions, version=VERSION)

    async def _on_engines(self, call, context):
        """Awaits a sessions call, which runs on the engine threads that own the process tables; UNAVAILABLE when
        no engine is alive."""
        try:
            return await call
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    async def StartSession(self, request: pb.StartSessionRequest, context) -> pb.StartSessionResponse:
        await self._check_ids(context, program_id=request.program_id)
        try:
            session, program = await self._on_engines(self.sessions.start(request.program_id), context)
        except SessionLimitError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e),
                                trailing_metadata=((RETRY_AFTER_KEY, str(self.options.retry_after_ms)),))
        except ValueError as e:  # the program already has a record: a session, or calls in flight
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        return pb.StartSessionResponse(session_id=session, program_id=program)

    async def EndSession(self, request: pb.EndSessionRequest, context) -> pb.EndSessionResponse:
        await self._check_ids(context, session_id=request.session_id)
        program = await self._on_engines(self.sessions.end(request.session_id), context)
        if program is not None and hasattr(self.llm, "end_program"):  # replicas: the router forgets its replica
            self.llm.end_program(program)
        return pb.EndSessionResponse(found=program is not None)


def _complete(request: pb.GenerateRequest, out: RequestOutput, c, ids: list[int], text: str,
              logprobs: list | None) -> pb.Complete:
    m = out.metrics
    msg = pb.Complete(index=c.index, output_ids=ids, text=text, finish_reason=c.finish_reason or "",
                      prompt_tokens=len(out.prompt_token_ids), completion_tokens=len(ids),
                      ttft_s=(m.ttft or 0.0) if m else 0.0, e2e_s=(m.e2e or 0.0) if m else 0.0,
                      queue_time_s=(m.queue_time or 0.0) if m else 0.0,
                      program_id=request.program_id, thread_id=request.thread_id)
    if isinstance(c.stop_reason, str):
        msg.stop_str = c.stop_reason
    elif c.stop_reason is not None:
        msg.stop_token_id = int(c.stop_reason)
    if c.cumulative_logprob is not None:
        msg.cumulative_logprob = c.cumulative_logprob
    _add_logprobs(msg.logprobs, logprobs or ())
    return msg


def _add_logprobs(field: Any, positions: Any) -> None:
    """Appends PositionLogprobs to a repeated field; a position without log-probs (a prompt's first) is empty."""
    for position in positions:
        field.add(entries=[pb.TokenLogprob(token_id=t, logprob=lp.logprob, rank=lp.rank or 0)
                           for t, lp in (position or {}).items()])


class NexusServer:
    """One gRPC server over one AsyncLLM or a ReplicatedAsyncLLM. `port = await start()`, then `await stop()`
    drains and shuts down."""

    def __init__(self, llm: AsyncLLM, options: ServerOptions = ServerOptions()):
        self.llm = llm
        self.options = options
        self.metrics = EngineMetrics(llm)
        self.servicer = NexusServicer(llm, options, self.metrics)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        o = self.options
        # SO_REUSEPORT off: on a port another server holds, binding must fail rather than split the traffic.
        channel_options = [("grpc.max_send_message_length", o.max_message_bytes),
                           ("grpc.max_receive_message_length", o.max_message_bytes), ("grpc.so_reuseport", 0)]
        interceptors = ([TokenAuth(o.auth_token)] if o.auth_token else []) + [ParseErrors(SERVICE_NAME)]
        server = grpc.aio.server(interceptors=interceptors, options=channel_options)
        pb_grpc.add_NexusServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{o.host}:{o.port}"
        try:
            if o.tls_cert is not None:
                with open(o.tls_key, "rb") as k, open(o.tls_cert, "rb") as c:
                    credentials = grpc.ssl_server_credentials([(k.read(), c.read())])
                self.port = server.add_secure_port(address, credentials)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:  # what grpcio raises when it cannot bind; older versions return 0
            self.port = 0
        if not self.port:
            raise OSError(f"cannot serve gRPC on {address}: the port is already in use (another server?) or the "
                          "address is not this host's; pick another --port")
        await server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Refuses new calls, lets open streams finish for `grace` seconds, cancels the rest (aborting their
        requests), then stops the engine threads."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self._server.stop(self.options.grace_s if grace is None else grace)
        self._server = None
        self.metrics.stop_http()
        self.llm.shutdown()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
