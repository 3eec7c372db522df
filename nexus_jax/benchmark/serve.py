"""The serving benchmark driver: send requests at a rate, record when every token arrived.

Arrivals follow a gamma process (shape = burstiness, mean gap = 1 / rate): burstiness 1 is Poisson, below 1
burstier, above 1 more regular; an infinite rate sends everything at once. A semaphore caps the requests in
flight (max_concurrency), as a client pool would. The driver talks to a `Backend`, so the same benchmark runs
in process (`InProcessBackend`) or over gRPC (`grpc_backend.GrpcBackend`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from typing import Any, Awaitable, Callable, Protocol

import numpy as np

from nexus_jax.benchmark.datasets import BenchRequest
from nexus_jax.core.sampling_params import SamplingParams


@dataclasses.dataclass
class RequestRecord:
    """One request's life on one monotonic clock (seconds): start = sent, token_times = each output token."""

    prompt_len: int
    output_len: int          # tokens asked for
    start: float
    token_times: list[float]
    end: float
    success: bool
    error: str | None = None
    source: str = ""


class Backend(Protocol):
    """What the driver needs from a server: its limits, one request at a time, and a description."""

    vocab_size: int
    max_model_len: int

    async def send(self, request: BenchRequest) -> RequestRecord:
        """Runs one request to the end (output length forced) and returns its timings; never raises for a
        failed request (success=False instead)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Device, model and settings, for the results file."""
        ...

    def close(self) -> Awaitable[None] | None:
        """Releases the engine or the connection; callers await an awaitable result (a network backend closes
        its channel on the event loop)."""
        ...


class InProcessBackend:
    """An `AsyncLLM` in this process; token times come from the engine's RequestMetrics (when each token became
    available), which is what a zero-latency client would see."""

    def __init__(self, llm: Any, description: dict[str, Any] | None = None):
        self.llm = llm
        self.vocab_size = llm.engine.vocab_size
        self.max_model_len = llm.engine.max_model_len
        self._description = description or {}

    @classmethod
    def from_config(cls, config: Any) -> "InProcessBackend":
        import jax

        from nexus_jax.entrypoints.async_llm import AsyncLLM
        llm = AsyncLLM.from_config(config)
        # A disaggregated engine knows its workers' device; asking JAX here would start a device client in
        # this process, which must leave the GPU to the workers.
        device = getattr(llm.engine, "device_kind", None)
        if device is None:
            d = jax.devices()[0]
            device = f"{d.platform}: {d.device_kind}"
        stats = llm.engine.stats()
        return cls(llm, {"backend": "in-process", "device": device, "jax": jax.__version__,
                         "engine_mode": stats.get("mode", "aggregated"), "sm_isolation": stats.get("sm_isolation"),
                         "engine_config": dataclasses.asdict(config)})

    async def send(self, request: BenchRequest) -> RequestRecord:
        params = SamplingParams(temperature=0.0, max_tokens=request.output_len, ignore_eos=True)
        start, out = time.monotonic(), None
        try:
            async for out in self.llm.generate(request.prompt, params, program_id=request.program_id,
                                               thread_id=request.thread_id):
                pass
        except Exception as e:  # a rejected or failed request is data, not a crash of the benchmark
            return RequestRecord(request.prompt_len or 0, request.output_len, start, [], time.monotonic(), False,
                                 f"{type(e).__name__}: {e}", request.source)
        m = out.metrics
        reason = out.outputs[0].finish_reason
        ok = reason == "length" and len(m.token_times) == request.output_len
        error = None if ok else (out.error or f"finished with {reason} after {len(m.token_times)} tokens")
        return RequestRecord(len(out.prompt_token_ids), request.output_len, m.arrival_time, list(m.token_times),
                             m.finished_time if m.finished_time is not None else time.monotonic(), ok, error,
                             request.source)

    async def engine_stats(self) -> dict[str, Any]:
        """The engine's counters so far (handoff, pacing, phase steps, faults...), JSON-ready; long lists (the
        controller's decision log) left out."""
        stats = await self.llm.run_on_engine(self.llm.engine.stats)
        return json.loads(json.dumps(_compact(stats), default=str))

    def describe(self) -> dict[str, Any]:
        return {**self._description, "max_model_len": self.max_model_len, "vocab_size": self.vocab_size}

    async def compiled_programs(self) -> int:
        """The engine's compiled step programs so far (on the engine thread, which owns the workers' pipes)."""
        return await self.llm.run_on_engine(self.llm.engine.compiled_programs)

    def close(self) -> None:
        self.llm.shutdown()


def _compact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items() if not (isinstance(v, (list, tuple)) and len(v) > 16)}
    return value


def arrival_offsets(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send times (seconds from the start) of n requests; the first goes at 0."""
    if not rate > 0:
        raise ValueError(f"request rate must be positive (or inf), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(n)
    gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


@dataclasses.dataclass
class RunResult:
    request_rate: float
    burstiness: float
    max_concurrency: int | None
    duration: float      # first send to last finish
    records: list[RequestRecord]


async def run_requests(backend: Backend, requests: list[BenchRequest], *, request_rate: float = math.inf,
                       burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0) -> RunResult:
    """Sends the requests on their arrival schedule and waits for all of them."""
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1 or None, got {max_concurrency}")
    offsets = arrival_offsets(len(requests), request_rate, burstiness, np.random.default_rng(seed))
    gate = asyncio.Semaphore(max_concurrency or len(requests))

    async def one(request: BenchRequest) -> RequestRecord:
        async with gate:
            return await backend.send(request)

    t0 = time.monotonic()
    tasks = []
    for request, offset in zip(requests, offsets):
        delay = t0 + offset - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(request)))
    records = list(await asyncio.gather(*tasks))
    first = min(r.start for r in records)
    return RunResult(request_rate, burstiness, max_concurrency, max(r.end for r in records) - first, records)


async def run_benchmark(backend: Backend, requests: list[BenchRequest], *, request_rate: float = math.inf,
                        burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0,
                        warmup: list[BenchRequest] | None = None) -> RunResult:
    """A warm-up batch (all at once, not recorded: it pays for compilation), then the measured run."""
    if warmup:
        await run_requests(backend, warmup, max_concurrency=max_concurrency, seed=seed)
    return await run_requests(backend, requests, request_rate=request_rate, burstiness=burstiness,
                              max_concurrency=max_concurrency, seed=seed)


async def find_max_rate(meets: Callable[[float], Awaitable[bool]], *, start: float = 1.0, max_rate: float = 1024.0,
                  iterations: int = 4) -> tuple[float | None, list[float]]:
    """The highest rate at which `await meets(rate)` holds, assuming it holds below a knee and fails above it.

    A ladder doubles the rate from `start` until a rate fails (or max_rate passes), then `iterations` bisection
    steps narrow the gap between the last pass and the first failure. Returns (best passing rate or None if even
    `start` fails, every rate tried in order).
    """
    if not 0 < start <= max_rate < math.inf:
        raise ValueError(f"need 0 < start <= max_rate < inf, got {start} and {max_rate}")
    tried: list[float] = []

    async def check(rate: float) -> bool:
        tried.append(rate)
        return await meets(rate)

    if not await check(start):
        return None, tried
    low, high = start, None
    while high is None:
        rate = min(low * 2, max_rate)
        if rate == low:
            return low, tried
        if await check(rate):
            low = rate
        else:
            high = rate
    for _ in range(iterations):
        mid = (low + high) / 2
        if await check(mid):
            low = mid
        else:
            high = mid
    return low, tried
