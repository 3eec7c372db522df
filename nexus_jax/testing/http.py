"""The OpenAI-compatible HTTP server over a mock engine in tests, on a thread with an event loop of its own (so
synchronous clients, the `openai` package's included, can call it)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from typing import Any, Iterator

from nexus_jax.core.engine import LLMEngine
from nexus_jax.entrypoints.async_llm import AsyncLLM
from nexus_jax.server import event_loop
from nexus_jax.server.http.server import HttpServer
from nexus_jax.server.options import ServerOptions


@contextlib.contextmanager
def http_serving(engine: LLMEngine, start_timeout: float = 30.0, **options: Any) -> Iterator[HttpServer]:
    """An HttpServer on 127.0.0.1 (a free port: server.port) over `engine`; `options` are ServerOptions fields.
    The server and its engine thread stop on exit."""
    loop = event_loop.loop_factory()()  # the serve command's loop
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    llm = AsyncLLM(engine)
    server = HttpServer(llm, ServerOptions(**options), port=0)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=start_timeout)
        yield server
    finally:
        with contextlib.suppress(concurrent.futures.TimeoutError):
            asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop).result(timeout=30)
        llm.shutdown()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)

