"""The load test's server side: a loopback gRPC server over the embedded model in a child process (so the RSS
sampled is the server's alone), and the counts a leak would leave behind inside it."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import multiprocessing
from typing import Any

from nexus_jax.server import event_loop


def _internals(server) -> dict[str, int]:
    """Counts that a leak would leave behind, read inside the server process (private fields included: a stream
    entry left in AsyncLLM after its request ended is exactly the leak this looks for). Collects garbage and
    hands freed heap pages back to the OS first, so the RSS sampled next is memory still in use, not malloc's
    cache. Python objects and RSS also grow with each step shape compiled for the first time (a bounded set);
    growth past the point where no new shape compiles is a leak."""
    from runner.programs import compiled_programs

    engine = server.llm.engine
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the RSS then includes malloc's free pages
        pass
    return {"servicer_streams": len(server.servicer.streams), "async_streams": len(server.llm._streams),
            "engine_groups": len(engine.groups), "free_blocks": engine.block_manager.num_free_blocks,
            "num_blocks": engine.block_manager.num_blocks,
            "cached_blocks": engine.block_manager.stats()["num_cached"], "python_objects": len(gc.get_objects()),
            "compiled_steps": compiled_programs()}


def _serve_child(engine_config: dict[str, Any], options: dict[str, Any], conn) -> None:
    event_loop.run(_child_main(engine_config, options, conn))  # the serve command's loop


async def _child_main(engine_config: dict[str, Any], options: dict[str, Any], conn) -> None:
    from nexus_jax.core.config import EngineConfig
    from nexus_jax.entrypoints.async_llm import AsyncLLM
    from nexus_jax.entrypoints.build import build_engine
    from nexus_jax.server.grpc_server import NexusServer, ServerOptions

    server = NexusServer(AsyncLLM(build_engine(EngineConfig(**engine_config))), ServerOptions(**options))
    conn.send(await server.start())
    loop = asyncio.get_running_loop()
    while True:
        try:
            message = await loop.run_in_executor(None, conn.recv)
        except EOFError:  # the parent is gone
            message = "stop"
        if message != "probe":
            break
        conn.send(_internals(server))
    await server.stop(grace=1.0)


class LocalServer:
    """A loopback gRPC server over the embedded model in a spawned child process, so the RSS sampled is the
    server's alone. A pipe carries its port, probes of its internal counts, and the stop."""

    def __init__(self, engine_config: dict[str, Any], max_in_flight: int, retry_after_ms: int,
                 startup_timeout_s: float = 300.0):
        self.engine_config = engine_config
        self.options = {"host": "127.0.0.1", "port": 0, "max_in_flight": max_in_flight,
                        "retry_after_ms": retry_after_ms}
        self.startup_timeout_s = startup_timeout_s
        self.target = ""
        self.pid = 0

    def __enter__(self) -> "LocalServer":
        ctx = multiprocessing.get_context("spawn")  # a fresh JAX runtime, not a fork of this one
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_child, args=(self.engine_config, self.options, child), daemon=True)
        self._proc.start()
        child.close()
        try:
            if not self._conn.poll(self.startup_timeout_s):
                raise RuntimeError(f"the load-test server did not start within {self.startup_timeout_s} s")
            port = self._conn.recv()
        except (EOFError, RuntimeError) as e:
            self._proc.kill()
            raise RuntimeError(f"the load-test server failed to start (exit code {self._proc.exitcode})") from e
        self.target, self.pid = f"127.0.0.1:{port}", self._proc.pid
        return self

    def probe(self) -> dict[str, int]:
        self._conn.send("probe")
        return self._conn.recv()

    def __exit__(self, *exc: Any) -> None:
        try:
            self._conn.send("stop")
        except OSError:
            pass
        self._proc.join(60)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB, from /proc (psutil is not a dependency)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")
