"""`HttpServer`: the OpenAI-compatible app served by uvicorn on the caller's event loop, next to the gRPC server.

The listening socket is bound here, without SO_REUSEPORT, so a port another process holds is an error at start
rather than a second server silently taking part of its traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from typing import Any, Iterator

import uvicorn

from nexus_jax.server.http.generation import Admission
from nexus_jax.server.http.routes import build_app
from nexus_jax.server.metrics import EngineMetrics
from nexus_jax.server.options import ServerOptions


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The serve command owns SIGINT/SIGTERM: it drains first, then stops this server.
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; OSError saying so when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not create_server's 0: asyncio turns Nagle off only on accepted sockets whose proto says
    # TCP, and with Nagle on a response's body waited for the client's delayed ACK (40 ms per keep-alive request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen()
        return sock
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise OSError(e.errno, f"cannot serve HTTP on {host}:{port}: the port is already in use (another "
                                   "server?); pick another --http-port") from None
        raise OSError(e.errno, f"cannot serve HTTP on {host}:{port}: {e.strerror}") from None


class HttpServer:
    """`port = await start()`, then `await stop()` drains (new requests get 503) and shuts down. The engine is the
    caller's to shut down: it may serve gRPC as well."""

    def __init__(self, llm: Any, options: ServerOptions, port: int, metrics: EngineMetrics | None = None):
        self.llm, self.options, self.requested_port = llm, options, port
        self.metrics = metrics if metrics is not None else EngineMetrics(llm)
        self.admission = Admission(options)
        self.app = build_app(llm, options, self.metrics, self.admission)
        self.port: int | None = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        sock = bind(self.options.host, self.requested_port)
        tls = ({"ssl_certfile": self.options.tls_cert, "ssl_keyfile": self.options.tls_key}
               if self.options.tls_cert else {})
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=1, **tls)
        self._server = _Uvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():  # it failed to start: say why
                sock.close()
                self._task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """New requests get 503 at once; open ones may finish for `grace` seconds (the options' grace_s), then
        the rest are cancelled, which aborts their engine requests."""
        if self._server is None:
            return
        self.admission.draining = True
        deadline = time.monotonic() + (self.options.grace_s if grace is None else grace)
        while self.admission.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._server.should_exit = True
        await self._task
        self._server = None
