"""The HTTP server's admission and lifecycle: 429 with Retry-After over max_in_flight, a disconnected client's
request aborted (streaming or not), 503 while draining, and no second server on a taken port (HTTP or gRPC)."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from nexus_jax.entrypoints.async_llm import AsyncLLM
from nexus_jax.server.grpc_server import NexusServer, ServerOptions
from nexus_jax.server.http.server import HttpServer, bind
from nexus_jax.testing.http import http_serving
from nexus_jax.testing.serving import server_engine


@pytest.fixture(scope="module")
def server():
    # 5 ms per step: a request of 400 tokens runs for seconds, long enough to act on it
    with http_serving(server_engine(delay=0.005), max_in_flight=1, retry_after_ms=2500) as server:
        yield server


def idle(server, timeout=5.0):
    """Whether the engine holds no request and no KV block and every admission slot is back, within `timeout`."""
    engine, end = server.llm.engine, time.monotonic() + timeout
    while time.monotonic() < end:
        if not engine.groups and engine.block_manager.usage == 0.0 and server.admission.in_flight == 0:
            return True
        time.sleep(0.01)
    return False


def test_over_max_in_flight_is_429_with_retry_after_and_a_dropped_stream_frees_its_slot(server):
    url = f"http://127.0.0.1:{server.port}/v1/completions"
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url, json={"prompt": [1, 2, 3], "max_tokens": 400, "stream": True}) as stream:
            lines = stream.iter_lines()  # held: dropping the iterator would close the response
            assert next(lines).startswith("data: {")
            r = http.post(url, json={"prompt": [4], "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "3"
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
        # the client closed the stream after one event: its request is aborted, its KV and slot freed
        assert idle(server)
        assert http.post(url, json={"prompt": [4], "max_tokens": 2}).status_code == 200


def test_a_client_that_disconnects_while_waiting_aborts_its_request(server):
    url = f"http://127.0.0.1:{server.port}/v1/completions"
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json={"prompt": [1, 2, 3], "max_tokens": 400}, timeout=0.3)
    assert idle(server) and time.monotonic() - started < 1.5  # 400 steps would take 2 s at least


def test_draining_answers_503_while_open_streams_finish():
    with http_serving(server_engine(delay=0.005)) as server:
        base = f"http://127.0.0.1:{server.port}"
        loop = server._task.get_loop()
        with httpx.Client(base_url=base, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json={"prompt": [1], "max_tokens": 60,
                                                              "stream": True}) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: {")
                stopping = asyncio.run_coroutine_threadsafe(server.stop(grace=10), loop)
                while not server.admission.draining:
                    time.sleep(0.01)
                r = http.post("/v1/completions", json={"prompt": [1], "max_tokens": 2})
                assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
                assert http.get("/health").status_code == 503
                assert [line for line in lines if line][-1] == "data: [DONE]"  # the open stream ran to its end
            stopping.result(timeout=10)


def test_connections_to_the_http_port_have_nagle_off():
    """With Nagle on, every keep-alive response's body waited for the client's delayed ACK: 44 ms per request."""
    with bind("127.0.0.1", 0) as listener, socket.create_connection(listener.getsockname()):
        conn, _ = listener.accept()
        with conn:
            assert conn.proto == socket.IPPROTO_TCP  # asyncio turns Nagle off only on sockets that say TCP
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_a_taken_port_is_refused_for_http_and_grpc():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        llm = AsyncLLM(server_engine())

        async def start(server):
            with pytest.raises(OSError, match="already in use"):
                await server.start()
        try:
            asyncio.run(start(HttpServer(llm, ServerOptions(), port=port)))
        finally:
            llm.shutdown()

    async def two_grpc_servers():
        first = NexusServer(AsyncLLM(server_engine()), ServerOptions(port=0))
        second = NexusServer(AsyncLLM(server_engine()), ServerOptions(port=await first.start()))
        try:
            with pytest.raises(OSError, match="already in use"):
                await second.start()
        finally:
            second.llm.shutdown()
            await first.stop(grace=0)
    asyncio.run(two_grpc_servers())


SERVE = ("import argparse, sys; from nexus_jax.cli.service import register; p = argparse.ArgumentParser(); "
         "register(p.add_subparsers(dest='command', required=True)); a = p.parse_args(); sys.exit(a.func(a))")


def test_serve_command_serves_grpc_and_http_on_one_engine_and_drains_on_sigterm(xla_cache_env):
    """`serve --port 0 --http-port 0` prints both addresses; the default model chats over HTTP with its template."""
    # The session's compilation cache: test_server.py's `serve` runs the same default engine.
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "serve", "--port", "0", "--http-port", "0", "--dtype",
                             "float32", "--api-key", "k"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, **xla_cache_env})
    try:
        grpc_line, http_line = proc.stdout.readline(), proc.stdout.readline()
        assert "serving embedded-default on 127.0.0.1:" in grpc_line, grpc_line
        assert "(OpenAI-compatible HTTP) on http://127.0.0.1:" in http_line, http_line
        base = http_line.split()[-1]
        r = httpx.post(f"{base}/chat/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                       json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
                             "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_http_front_runs_without_grpc_extras():
    """The GPU machine has no grpc_health / grpc_reflection: the HTTP server and its test harness must not need
    them (they import the server options from nexus_jax.server.options, not the gRPC server)."""
    code = ("import sys; sys.modules['grpc_health'] = sys.modules['grpc_reflection'] = None\n"
            "import nexus_jax.testing.http, nexus_jax.server.http.server\n"
            "assert 'nexus_jax.server.grpc_server' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
