"""In-process stand-ins for runner/workers/pool.py's WorkerPool and WorkerHandle, for the disaggregated engine's
tests: every worker runs its requests on one shared MockExecutor, and `wait` returns a random subset of the busy
handles (maybe none), so results are folded back in a random order that interleaves the phases. A handle sent
decode-loop messages runs the real loop (runner.workers.decode_loop, depth 2: its feeds on the mock's samples),
a random number of steps each time the pool is waited on.

tests/disagg/test_mock_pool.py checks that these classes have every public method of the real ones, with the same
parameters, so a change to the pool's protocol fails there before it silently passes here.
"""

from __future__ import annotations

import collections
import random
from typing import Any, Sequence

from nexus_jax.disagg.ladder import AGGREGATE, HOLDER, SmLadder
from nexus_jax.testing.engines import VOCAB
from nexus_jax.testing.mock_executor import MockExecutor
from runner.workers.decode_loop import DecodeLoop
from runner.workers.messages import Execute, Message
from runner.workers.pool import MAX_OUTSTANDING, WorkerError


class MockHandle:
    """A worker that runs a submitted request at once and keeps its result until `result()` is called; like a
    real worker it holds up to MAX_OUTSTANDING requests and answers them in order. Its device-side samples (what a
    later step's feed reads) are its own, as each worker process's are."""

    def __init__(self, name: str, mock: MockExecutor):
        self.name, self.mock, self.calls = name, mock, 0
        self.results: collections.deque = collections.deque()
        self.last_tokens = mock.last_tokens
        self.stopped = False
        self.dead = False
        self.loop: DecodeLoop | None = None
        self._events: list = []
        self.posted = 0  # decode-loop messages received

    @property
    def outstanding(self) -> int:
        return len(self.results)

    @property
    def busy(self) -> bool:
        return bool(self.results) or self.loop is not None

    @property
    def unread(self) -> bool:
        return bool(self._events)

    def submit(self, message: Message) -> None:
        assert self.outstanding < MAX_OUTSTANDING, f"{self.name} got a request while holding {self.outstanding}"
        assert isinstance(message, Execute), message
        self.calls += 1
        self.mock.last_tokens = self.last_tokens
        self.results.append(self.mock.execute(message.step))
        self.last_tokens = self.mock.last_tokens

    def result(self) -> Any:
        if self.dead:
            raise WorkerError(f"worker {self.name} died")
        return self.results.popleft()

    def post(self, message: Message) -> None:
        if self.dead:
            raise WorkerError(f"worker {self.name} is gone")
        if self.loop is None:
            self.loop = DecodeLoop(self.mock, lambda event: self._events.append(event), depth=2)
        self.posted += 1
        self.loop.post(message)

    def events(self) -> list[Any]:
        if self.dead:
            raise WorkerError(f"worker {self.name} died")
        events, self._events = self._events, []
        return events

    def run_loop(self, steps: int) -> None:
        """Lets the loop pass `steps` step boundaries, on this worker's own device samples."""
        for _ in range(steps if self.loop is not None and not self.dead else 0):
            self.mock.last_tokens = self.last_tokens
            self.loop.advance()
            self.last_tokens = self.mock.last_tokens

    def kill(self) -> None:
        """The process dies: what it holds is lost, and it answers nothing more."""
        self.dead = self.stopped = True

    def drop_result(self) -> None:
        """Forgets the oldest reply, for a test that makes it fail instead."""
        self.results.popleft()

    def call(self, message: Message) -> Any:
        self.submit(message)
        return self.result()

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "device_kind": "mock"}

    def alive(self) -> bool:
        return not self.stopped

    def stop(self, timeout: float = 10.0) -> None:
        self.stopped = True


class MockPool:
    """The ladder's workers (the aggregate one standing in for the holder too), over one MockExecutor."""

    def __init__(self, ladder: Sequence[int] | SmLadder, num_blocks: int = 256, block_size: int = 4, seed: int = 0):
        self.mock = MockExecutor(VOCAB, num_blocks, block_size)
        ladder = ladder if isinstance(ladder, SmLadder) else SmLadder(ladder)
        names = [w.name for w in ladder.workers if w.role != HOLDER]
        self.workers = {n: MockHandle(n, self.mock) for n in names}
        self.shared = type("Shared", (), {"kv_shape": (1, 2, num_blocks), "kernel_impl": "mock", "dtype": "f32",
                                           "private_workers": (), "device_bytes": 0})
        self.startup_seconds: dict[str, float] = {}
        self.rng = random.Random(seed)
        self.holder_name = AGGREGATE  # stands in for the holder: alive while the mock lives

    def replace(self, name: str, timeout: float = 1800.0) -> MockHandle:
        """A fresh handle in place of worker `name`, over the same MockExecutor (the shared KV pool)."""
        self.workers.pop(name).stop()
        self.workers[name] = MockHandle(name, self.mock)
        return self.workers[name]

    def wait(self, handles: Sequence[MockHandle], timeout: float | None = None) -> list[MockHandle]:
        # Sometimes none, as a wait that times out before any step is done: the engine then plans ahead.
        for h in handles:
            if h.loop is not None:
                h.run_loop(self.rng.randint(0, 3))
        busy = [h for h in handles if h.busy or h.unread]
        return self.rng.sample(busy, self.rng.randint(0, len(busy))) if busy else []

    def close(self) -> None:
        pass
