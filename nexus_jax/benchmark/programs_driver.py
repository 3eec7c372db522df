"""Agentic program workloads in bench serve: programs of dependent calls arriving at a rate (programs/s).

Programs come from `nexus_jax.benchmark.workloads` (chatbot, ReAct, tree search; docs/programs.md). Their arrival
times are drawn here, like requests' (`serve.arrival_offsets`: gamma gaps, Poisson at burstiness 1), so that one set of
programs can be replayed at every rate of a sweep. A program runs its stages in order: a stage waits its delay
(think or tool time, times `delay_scale`) after the previous stage finished, then sends its calls concurrently
(one thread each) and waits for all of them. A failed call fails its program, which stops there.

Prompts are random token ids, but a program's calls read one context: call k's prompt is the first
`prompt_tokens` ids of the program's own random sequence, so a later call shares the previous calls' prompts as
a prefix (the history of a conversation, the instructions of an agent, the path of a tree) and prefix caching
finds them, as it would in a real program. (The previous call's output is not part of the next prompt: the
generated ids are not known in advance, so the cache hit is smaller than a real program's by that output.)
Every call carries the program's id (unique per run, so that a sweep's runs do not share process-table entries)
and its thread id through the backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import uuid

import numpy as np

from nexus_jax.benchmark import workloads
from nexus_jax.benchmark.datasets import BenchRequest, clip_to_context
from nexus_jax.benchmark.serve import Backend, RequestRecord, RunResult, arrival_offsets
from nexus_jax.benchmark.workloads import CallSpec, ProgramSpec

PROGRAM_DATASETS = {"chatbot": "chatbot", "react": "react", "tree": "tree", "programs-mix": "mixed"}


@dataclasses.dataclass
class ProgramRecord:
    """One program's life on the run's clock: start = arrival, end = its last call finished (or failed)."""

    program_id: str
    kind: str
    start: float
    end: float
    num_calls: int           # calls the program has; fewer are sent when one fails
    calls: list[int]         # indices of its calls in the run's records, stage by stage
    output_tokens: int
    success: bool
    error: str | None = None


@dataclasses.dataclass
class ProgramRunResult(RunResult):
    """A run of programs: `records` holds every call, `programs` every program (request_rate is programs/s)."""

    programs: list[ProgramRecord]


def make_programs(dataset: str, num_programs: int, seed: int = 0) -> list[ProgramSpec]:
    """The programs of a program dataset; their `arrival` is ignored (run_programs draws arrivals per rate)."""
    if dataset not in PROGRAM_DATASETS:
        raise ValueError(f"unknown program dataset {dataset!r}; known: {', '.join(PROGRAM_DATASETS)}")
    if num_programs < 1:
        raise ValueError(f"num_programs must be >= 1, got {num_programs}")
    return workloads.generate(PROGRAM_DATASETS[dataset], num_programs, rate=1.0, seed=seed)


def program_kind(spec: ProgramSpec) -> str:
    return spec.program_id.rsplit("-", 1)[0]  # workloads name programs "<kind>-<index>"


def program_context(spec: ProgramSpec, vocab_size: int, max_model_len: int, seed: int,
                    salt: int = 0) -> np.ndarray:
    """The program's token sequence, long enough for its longest (clipped) prompt; reproducible from the seed,
    the salt and the program's id."""
    longest = max(clip_to_context(c.prompt_tokens, c.output_tokens, max_model_len)[0]
                  for s in spec.stages for c in s.calls)
    name = int.from_bytes(spec.program_id.encode(), "little")
    return np.random.default_rng([seed, salt, name]).integers(0, vocab_size, longest)


def call_request(call: CallSpec, context: np.ndarray, max_model_len: int, kind: str,
                 program_id: str | None) -> BenchRequest:
    prompt_len, output_len = clip_to_context(call.prompt_tokens, call.output_tokens, max_model_len)
    return BenchRequest({"prompt_token_ids": context[:prompt_len].tolist()}, prompt_len, output_len, kind,
                        program_id, call.thread_id)


def warmup_calls(programs: list[ProgramSpec], count: int, *, vocab_size: int, max_model_len: int,
                 seed: int) -> list[BenchRequest]:
    """The first `count` calls of the programs as independent requests (no program id): warm-up pays for
    compilation of the shapes program calls meet, without the programs' delays."""
    requests: list[BenchRequest] = []
    for spec in programs:
        context = program_context(spec, vocab_size, max_model_len, seed)
        for stage in spec.stages:
            for call in stage.calls:
                if len(requests) == count:
                    return requests
                requests.append(call_request(call, context, max_model_len, program_kind(spec), None))
    return requests


async def run_programs(backend: Backend, programs: list[ProgramSpec], *, program_rate: float = math.inf,
                       burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0,
                       delay_scale: float = 1.0, salt: int = 0) -> ProgramRunResult:
    """Runs every program from its arrival to its last call. max_concurrency caps calls in flight (over all
    programs); salt varies the prompts' token ids (not their lengths) between runs of one sweep."""
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1 or None, got {max_concurrency}")
    if not delay_scale >= 0:
        raise ValueError(f"delay_scale must be >= 0, got {delay_scale}")
    offsets = arrival_offsets(len(programs), program_rate, burstiness, np.random.default_rng(seed))
    gate = asyncio.Semaphore(max_concurrency or sum(p.num_calls for p in programs))
    records: list[RequestRecord] = []
    tag = uuid.uuid4().hex[:8]

    async def send(request: BenchRequest) -> int:
        async with gate:
            record = await backend.send(request)
        records.append(record)
        return len(records) - 1

    async def program(spec: ProgramSpec, arrive_at: float) -> ProgramRecord:
        await asyncio.sleep(max(arrive_at - time.monotonic(), 0.0))
        start = time.monotonic()
        kind, sent_id = program_kind(spec), f"{spec.program_id}-{tag}"
        context = program_context(spec, backend.vocab_size, backend.max_model_len, seed, salt)
        calls: list[int] = []
        error = None
        for stage in spec.stages:
            if stage.delay > 0 and delay_scale > 0:
                await asyncio.sleep(stage.delay * delay_scale)
            done = await asyncio.gather(*(send(call_request(c, context, backend.max_model_len, kind, sent_id))
                                          for c in stage.calls))
            calls += done
            failed = [records[i] for i in done if not records[i].success]
            if failed:
                error = failed[0].error
                break
        return ProgramRecord(spec.program_id, kind, start, max(records[i].end for i in calls), spec.num_calls,
                             calls, sum(len(records[i].token_times) for i in calls), error is None, error)

    t0 = time.monotonic()
    done = await asyncio.gather(*(program(spec, t0 + offset) for spec, offset in zip(programs, offsets)))
    duration = max(p.end for p in done) - min(p.start for p in done)
    return ProgramRunResult(program_rate, burstiness, max_concurrency, duration, records, list(done))
