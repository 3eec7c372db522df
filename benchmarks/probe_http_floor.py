"""What an HTTP round trip costs on this host before any of nexus-jax's work: issue 18's "+1 ms over in-process" at
light load, split into the server stack and the host's wake-ups.

  PYTHONPATH=. python3 benchmarks/probe_http_floor.py [--requests 200] [--json out.json]

Servers, each answering a POST of a 128-token completion body with one fixed SSE event (no engine):
- uvicorn with uvloop + httptools running a plain ASGI app (how nexus-jax's generation routes are served);
- a bare asyncio Protocol that answers without parsing (on uvloop): the least any Python server can do;
- a blocking socket thread that answers each read at once: the loopback round trip alone.
The client is http.client in another process (as a real client is), reading until the first event. Each server is
timed with the client pausing 20 ms between requests (light load: the threads sleep and the cores idle between
requests, as in the TTFT benchmark) and back to back. Their difference is the cost of waking idle threads and cold
caches, which no server code removes.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

EVENT = b'data: {"choices":[{"index":0,"text":"a"}]}\n\ndata: [DONE]\n\n'
RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(EVENT)) + EVENT

BODY = json.dumps({"model": "m", "prompt": list(range(100, 228)), "max_tokens": 2, "ignore_eos": True, "stream": True})


def bare_ttft(conn: http.client.HTTPConnection, body: str) -> float:
    """Seconds to the first event with a choice, reading raw chunks (no SSE parser); reads the stream to its end."""
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response, seen, first = conn.getresponse(), b"", None
    while chunk := response.read1(65536):
        seen += chunk
        if first is None and b'"choices":[{' in seen:
            first = time.perf_counter() - start
    response.read()  # a body sized by Content-Length is not closed by read1 alone (the connection stays busy)
    if first is None:
        raise RuntimeError(f"no choice in the stream: {seen[:200]!r}")
    return first


def client(port: int, requests: int, gap: float, bodies: list[str] | None = None) -> dict:
    """This process as the client: `requests` requests (or one per body of `bodies`) `gap` seconds apart on one
    connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    times = []
    for body in bodies or [BODY] * requests:
        times.append(bare_ttft(conn, body))
        time.sleep(gap)
    conn.close()
    return {"median_ms": 1e3 * statistics.median(times), "p90_ms": 1e3 * sorted(times)[int(0.9 * len(times))],
            "times_ms": [1e3 * t for t in times]}


def client_process(port: int, gap: float, bodies: list[str]) -> list[float]:
    """Seconds to the first event of each body, sent by a client in a process of its own (as a real client is: a
    client thread beside the server shares its GIL)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(bodies, f)
    try:
        out = subprocess.run([sys.executable, __file__, "--client", str(port), str(gap), "--bodies", f.name],
                             capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    return [t / 1e3 for t in json.loads(out.stdout)["times_ms"]]


async def asgi_app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:  # the body is read whole, as the generation routes do
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": EVENT})


def start_uvicorn() -> int:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(asgi_app, log_level="warning", lifespan="off", access_log=False, loop="uvloop",
                            http="httptools")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return sock.getsockname()[1]


class _Answer(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:  # the client sends each request in one write
        self.transport.write(RESPONSE)


def start_protocol() -> int:
    import uvloop

    ports: list[int] = []

    def run() -> None:
        loop = uvloop.new_event_loop()
        server = loop.run_until_complete(loop.create_server(_Answer, "127.0.0.1", 0))
        ports.append(server.sockets[0].getsockname()[1])
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    while not ports:
        time.sleep(0.01)
    return ports[0]


def start_socket() -> int:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def run() -> None:
        while True:
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while conn.recv(65536):
                    conn.sendall(RESPONSE)
            except OSError:  # the client process closed without a goodbye
                pass
            conn.close()

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[1]


SERVERS: dict[str, Callable[[], int]] = {"uvicorn (uvloop, httptools), plain ASGI": start_uvicorn,
                                         "asyncio Protocol on uvloop, no parsing": start_protocol,
                                         "blocking socket thread": start_socket}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--json", default=None)
    p.add_argument("--client", nargs=2, type=float, metavar=("PORT", "GAP"), help=argparse.SUPPRESS)
    p.add_argument("--bodies", default=None, help=argparse.SUPPRESS)  # the client's request bodies (a JSON list)
    args = p.parse_args(argv)
    if args.client:  # a client process the probe (or bench_structured) starts
        bodies = json.loads(Path(args.bodies).read_text()) if args.bodies else None
        print(json.dumps(client(int(args.client[0]), args.requests, args.client[1], bodies)))
        return {}
    results = {}
    for name, start in SERVERS.items():
        port = start()
        row = {}
        for label, gap in (("light load (20 ms apart)", 0.02), ("back to back", 0.0)):
            out = subprocess.run([sys.executable, __file__, "--client", str(port), str(gap), "--requests",
                                  str(args.requests)], capture_output=True, text=True, check=True)
            row[label] = json.loads(out.stdout)
        results[name] = row
        print(f"{name:42s} " + "  ".join(f"{k}: {v['median_ms']:.3f} ms (p90 {v['p90_ms']:.3f})"
                                         for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"requests": args.requests, "servers": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
