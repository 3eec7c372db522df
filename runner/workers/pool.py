"""The engine's side of the worker processes: start them, send them steps, collect results, notice deaths.

Workers are fresh interpreters (`python -m runner.workers.worker`; a forked JAX runtime is unsafe, and multiprocessing's
spawn would re-run the user's main script), talking over a socket pair, each with its own environment: the MPS
client variables with its SM share, no up-front device memory grab (several JAX processes share one GPU), and one
persistent compilation cache, so that workers after the first load their programs instead of compiling.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Sequence

from runner.compilation_cache import compilation_cache_env
from runner.workers.messages import Info, Message, Stop
from runner.workers.mps import SM_PERCENT_ENV
from runner.workers.worker import FD_ENV, SharedModel, WorkerSpec, worker_memory_fraction

log = logging.getLogger(__name__)
_ROOT = str(Path(__file__).resolve().parents[2])  # so the worker imports this checkout's packages


class WorkerError(RuntimeError):
    """A worker failed a request, or died."""


# Requests a worker may hold at once: the step it runs and the next one, queued behind it on the device (the
# pipelined decode loop), so that the device never waits for the engine's round trip.
MAX_OUTSTANDING = 2


class WorkerHandle:
    def __init__(self, spec: WorkerSpec, process: Any, conn: Connection):
        self.spec = spec
        self.name = spec.name
        self.process = process
        self.conn = conn
        self.outstanding = 0  # requests sent and not yet answered
        self.streams = False  # runs a decode loop, whose events come unasked (see post and events)
        self._replies: collections.deque = collections.deque()  # read while looking for events
        self._events: list = []

    @property
    def busy(self) -> bool:
        return self.outstanding > 0 or self.streams

    def submit(self, message: Message) -> None:
        """Sends one message; its reply comes from result(), replies in the order the requests were sent."""
        if self.outstanding >= MAX_OUTSTANDING:
            raise RuntimeError(f"worker {self.name} already holds {self.outstanding} requests")
        try:
            self.conn.send(message)
        except (OSError, EOFError) as e:
            raise WorkerError(f"worker {self.name} is gone ({self._exit()}): {e}") from e
        self.outstanding += 1

    def post(self, message: Message) -> None:
        """Sends a decode-loop message (runner.workers.messages.Admit, Extend, Release, Expect): no reply; what the loop
        does comes back through events()."""
        try:
            self.conn.send(message)
        except (OSError, EOFError) as e:
            raise WorkerError(f"worker {self.name} is gone ({self._exit()}): {e}") from e
        self.streams = True

    def events(self) -> list[Any]:
        """The events the worker sent so far, without waiting; raises WorkerError once it died."""
        while self.conn.poll(0):
            self._receive()
        events, self._events = self._events, []
        return events

    def _receive(self) -> None:
        try:
            item = self.conn.recv()
        except (EOFError, OSError) as e:
            self.outstanding = 0  # a dead worker answers nothing more
            raise WorkerError(f"worker {self.name} died ({self._exit()})") from e
        if item[0] == "event":
            self._events.append(item[1])
        else:
            self._replies.append(item)

    @property
    def unread(self) -> bool:
        """Whether a reply or an event was read off the socket (looking for events) and not yet taken."""
        return bool(self._replies or self._events)

    def result(self) -> Any:
        """Waits for the oldest request's reply; raises WorkerError for a failure or a dead worker."""
        while not self._replies:
            self._receive()
        status, value = self._replies.popleft()
        self.outstanding -= 1
        if status == "error":
            raise WorkerError(f"worker {self.name}: {value}")
        return value

    def call(self, message: Message) -> Any:
        self.submit(message)
        return self.result()

    def info(self) -> dict[str, Any]:
        """What the worker reports of itself (see runner.workers.worker._Worker.info)."""
        return self.call(Info())

    def alive(self) -> bool:
        return self.process.poll() is None

    def _exit(self) -> str:
        try:
            return f"exit code {self.process.wait(timeout=1.0)}"
        except subprocess.TimeoutExpired:
            return "still running"

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            try:
                self.conn.send(Stop())
            except (OSError, EOFError):
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.conn.close()


class WorkerPool:
    """A holder process that owns the shared weights and pool, then the workers, all ready when this returns."""

    def __init__(self, specs: Sequence[WorkerSpec], *, compilation_cache_dir: str | None = None,
                 start_timeout: float = 1800.0):
        """specs: one per worker, the holder first; each spec's env holds its MPS client variables (none: no MPS,
        its SM share is not enforced)."""
        if not specs:
            raise ValueError("a worker pool needs at least one worker")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"worker names must be unique, got {names}")
        self.workers: dict[str, WorkerHandle] = {}
        self._cache_dir = compilation_cache_dir
        self.startup_seconds: dict[str, float] = {}
        try:
            holder = specs[0]
            self.holder_name = holder.name
            self.shared: SharedModel = self._start(holder, None, start_timeout)
            # The others map the holder's memory; they start in parallel.
            pending = [self._launch(s, self.shared) for s in specs[1:]]
            for handle, t0 in pending:
                self._await_ready(handle, t0, start_timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, spec: WorkerSpec, shared: SharedModel | None, timeout: float) -> SharedModel:
        handle, t0 = self._launch(spec, shared)
        return self._await_ready(handle, t0, timeout)

    def _launch(self, spec: WorkerSpec, shared: SharedModel | None):
        env = worker_env(spec, shared, self._cache_dir)
        ours, theirs = socket.socketpair()
        env[FD_ENV] = str(theirs.fileno())
        process = subprocess.Popen([sys.executable, "-m", "runner.workers.worker"], env=env, pass_fds=[theirs.fileno()])
        theirs.close()
        conn = Connection(ours.detach())
        handle = WorkerHandle(spec, process, conn)
        self.workers[spec.name] = handle
        conn.send((spec, shared))
        return handle, time.monotonic()

    def _await_ready(self, handle: WorkerHandle, t0: float, timeout: float) -> SharedModel:
        if not handle.conn.poll(timeout):
            raise WorkerError(f"worker {handle.name} did not start within {timeout:.0f} s")
        try:
            status, value = handle.conn.recv()
        except (EOFError, OSError) as e:
            raise WorkerError(f"worker {handle.name} died while starting ({handle._exit()})") from e
        if status != "ready":
            raise WorkerError(str(value))
        self.startup_seconds[handle.name] = time.monotonic() - t0
        log.info("worker %s ready in %.1f s (SM share %s)", handle.name, self.startup_seconds[handle.name],
                 dict(handle.spec.env).get(SM_PERCENT_ENV, "not enforced"))
        return value

    def replace(self, name: str, timeout: float = 1800.0) -> WorkerHandle:
        """Starts a new process in place of worker `name` (dead, or to be stopped): same spec, SM share and
        shared memory; raises WorkerError when it does not come up."""
        if name == self.holder_name:
            raise ValueError("the holder owns the shared memory: a new holder needs a new pool")
        old = self.workers.pop(name)
        old.stop(timeout=5.0)
        handle, t0 = self._launch(old.spec, self.shared)
        self._await_ready(handle, t0, timeout)
        return handle

    def wait(self, handles: Sequence[WorkerHandle], timeout: float | None = None) -> list[WorkerHandle]:
        """The busy handles among `handles` whose oldest reply, an event (a decode loop's), or death is ready."""
        by_conn = {h.conn: h for h in handles if h.busy}
        read = [h for h in by_conn.values() if h.unread]
        if read or not by_conn:
            return read
        return [by_conn[c] for c in wait(list(by_conn), timeout)]

    def close(self) -> None:
        # The holder last: the others map its memory.
        for handle in reversed(list(self.workers.values())):
            handle.stop()
        self.workers.clear()
        # A holder that was killed never unlinked its shm segments (CUDA memory goes with the process).
        for arena in (getattr(self, "shared", None) and (self.shared.weights, self.shared.kv)) or ():
            if arena.kind == "shm":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"/dev/shm/{arena.name}")


class PoolView:
    """The executor facade LLMEngine's constructor reads (block geometry); steps go through the pool."""

    def __init__(self, pool: WorkerPool, block_size: int):
        self.pool = pool
        self.block_size = block_size
        self.num_blocks = pool.shared.kv_shape[2]
        self.kernel_impl = pool.shared.kernel_impl
        self.dtype = pool.shared.dtype


def worker_env(spec: WorkerSpec, shared: SharedModel | None, cache_dir: str | None) -> dict[str, str]:
    """A worker process's environment: this one's without MPS settings, XLA growing its allocator on demand up to
    the worker's share of the device (none for the holder, which sizes the shares), then the spec's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUDA_MPS_")}
    env.update({"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_CPP_MIN_LOG_LEVEL": "2",
                "PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH")]))})
    fraction = None if shared is None else worker_memory_fraction(spec, shared)
    if fraction is not None:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.4f}"
    env.update(dict(spec.env))
    if cache_dir:
        env.update(compilation_cache_env(cache_dir))
    return env
