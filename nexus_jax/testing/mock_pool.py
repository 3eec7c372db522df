"""In-process stand-ins for runner/workers/pool.py's WorkerPool and WorkerHandle, for the disaggregated engine's
tests: every worker runs its requests on one shared MockExecutor, and `wait` returns a random subset of the busy
handles (maybe none), so results are folded back in a random order that interleaves the phases.

tests/disagg/test_mock_pool.py checks that these classes have every public method of the real ones, with the same
parameters, so a change to the pool's protocol fails there before it silently passes here.
"""

from __future__ import annotations

import collections
import random
from typing import Any, Sequence

from nexus_jax.disagg.ladder import AGGREGATE, decode_worker, prefill_worker
from nexus_jax.testing.engines import VOCAB
from nexus_jax.testing.mock_executor import MockExecutor
from runner.workers.messages import Execute, Message
from runner.workers.pool import MAX_OUTSTANDING


class MockHandle:
    """A worker that runs a submitted request at once and keeps its result until `result()` is called; like a
    real worker it holds up to MAX_OUTSTANDING requests and answers them in order. Its device-side samples (what a
    later step's feed reads) are its own, as each worker process's are."""

    def __init__(self, name: str, mock: MockExecutor):
        self.name, self.mock, self.calls = name, mock, 0
        self.results: collections.deque = collections.deque()
        self.last_tokens = mock.last_tokens
        self.stopped = False

    @property
    def outstanding(self) -> int:
        return len(self.results)

    @property
    def busy(self) -> bool:
        return bool(self.results)

    def submit(self, message: Message) -> None:
        assert self.outstanding < MAX_OUTSTANDING, f"{self.name} got a request while holding {self.outstanding}"
        assert isinstance(message, Execute), message
        self.calls += 1
        self.mock.last_tokens = self.last_tokens
        self.results.append(self.mock.execute(message.step))
        self.last_tokens = self.mock.last_tokens

    def result(self) -> Any:
        return self.results.popleft()

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
    """The aggregate worker and a decode and a prefill worker per SM share of `ladder`, over one MockExecutor."""

    def __init__(self, ladder: Sequence[int], num_blocks: int = 256, block_size: int = 4, seed: int = 0):
        self.mock = MockExecutor(VOCAB, num_blocks, block_size)
        names = [AGGREGATE] + [n for s in ladder for n in (decode_worker(s), prefill_worker(s))]
        self.workers = {n: MockHandle(n, self.mock) for n in names}
        self.shared = type("Shared", (), {"kv_shape": (1, 2, num_blocks), "kernel_impl": "mock", "dtype": "f32"})
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
        busy = [h for h in handles if h.busy]
        return self.rng.sample(busy, self.rng.randint(0, len(busy))) if busy else []

    def close(self) -> None:
        pass
