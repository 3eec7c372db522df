"""In-process stand-ins for runner/workers/pool.py's WorkerPool and WorkerHandle, for the disaggregated engine's
tests: every worker runs its requests on one shared MockExecutor, and `wait` returns a random subset of the busy
handles, so results are folded back in a random order that interleaves the phases.

tests/disagg/test_mock_pool.py checks that these classes have every public method of the real ones, with the same
parameters, so a change to the pool's protocol fails there before it silently passes here.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from nexus_jax.disagg.ladder import AGGREGATE, decode_worker, prefill_worker
from nexus_jax.testing.engines import VOCAB
from nexus_jax.testing.mock_executor import MockExecutor
from runner.workers.messages import Execute, Message


class MockHandle:
    """A worker that runs a submitted request at once and keeps its result until `result()` is called."""

    def __init__(self, name: str, mock: MockExecutor):
        self.name, self.mock, self.busy, self.result_value, self.calls = name, mock, False, None, 0
        self.stopped = False

    def submit(self, message: Message) -> None:
        assert not self.busy, f"{self.name} got a second request while busy"
        assert isinstance(message, Execute), message
        self.busy, self.calls = True, self.calls + 1
        self.result_value = self.mock.execute(message.step)

    def result(self) -> Any:
        self.busy = False
        return self.result_value

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
        busy = [h for h in handles if h.busy]
        return self.rng.sample(busy, self.rng.randint(1, len(busy))) if busy else []

    def close(self) -> None:
        pass
