"""The gRPC server over mock engines in tests: a loopback server with its client, and reading its streams."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from typing import Any, AsyncIterator, Awaitable, Iterator

import grpc

from nexus_jax.core.engine import LLMEngine
from nexus_jax.core.tokenizer import Tokenizer
from nexus_jax.entrypoints.async_llm import AsyncLLM
from nexus_jax.server.client import Client
from nexus_jax.server.grpc_server import NexusServer, ServerOptions
from nexus_jax.testing.engines import make_engine
from nexus_jax.testing.streams import wait_until

EOS = 2  # the end-of-sequence id of the served engine when it has a tokenizer


def server_engine(delay: float = 0.0, tokenizer: Tokenizer | None = None, num_blocks: int = 1024,
                  **config: Any) -> LLMEngine:
    """The mock engine the server tests serve: every step sleeps `delay` s, so a request is still running when a
    test acts on it."""
    return make_engine(num_blocks, tokenizer=tokenizer, eos=(EOS,) if tokenizer else (), step_seconds=delay,
                       **config)


@contextlib.asynccontextmanager
async def serving(llm: LLMEngine | Any, **options: Any) -> AsyncIterator[tuple[NexusServer, Client]]:
    """A server on 127.0.0.1 over `llm` (an engine, wrapped in an AsyncLLM, or an AsyncLLM-like front) and a
    client of it; `options` are ServerOptions fields."""
    server = NexusServer(AsyncLLM(llm) if isinstance(llm, LLMEngine) else llm, ServerOptions(**options))
    port = await server.start()
    client = Client(f"127.0.0.1:{port}", token=options.get("auth_token"))
    try:
        yield server, client
    finally:
        await client.close()
        await server.stop(grace=1.0)


@contextlib.contextmanager
def serving_on_a_thread(llm: LLMEngine | Any, start_timeout: float = 60.0, **options: Any) -> Iterator[NexusServer]:
    """`serving` on a thread with an event loop of its own, for callers that block (gRPC's synchronous stubs, a
    command that runs asyncio.run itself); yields the server once it started, within `start_timeout` s."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    started: concurrent.futures.Future = concurrent.futures.Future()

    async def hold(stop: asyncio.Event):
        async with serving(llm, **options) as (server, _):
            started.set_result(server)
            await stop.wait()
    stop = asyncio.Event()
    held = asyncio.run_coroutine_threadsafe(hold(stop), loop)
    try:
        yield started.result(timeout=start_timeout)
    finally:
        loop.call_soon_threadsafe(stop.set)
        held.result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


async def collect(client: Client, prompt: Any, **kw: Any) -> tuple[list, list]:
    """One Generate stream to its end: (its chunks, its completions); fails on an error response."""
    chunks, completes = [], []
    async for r in client.generate(prompt, **kw):
        kind = r.WhichOneof("response")
        assert kind != "error", r.error.message
        (chunks if kind == "chunk" else completes).append(getattr(r, kind))
    return chunks, completes


async def engine_idle(engine: LLMEngine, timeout: float = 5.0) -> bool:
    """Waits for the engine thread to process aborts; true when no request and no KV block is held."""
    return await wait_until(lambda: not engine.groups and engine.block_manager.usage == 0.0, timeout)


async def rejected(call: Awaitable) -> grpc.aio.AioRpcError:
    """The error a call that must fail raises."""
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e
    raise AssertionError("the call succeeded")
