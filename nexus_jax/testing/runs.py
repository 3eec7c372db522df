"""Driving an engine to the end in tests: greedy requests, arrivals spread over steps, the finished outputs."""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Callable, Sequence

from nexus_jax.core.outputs import RequestOutput
from nexus_jax.core.sampling_params import SamplingParams
from nexus_jax.testing.engines import VOCAB

# {step index: [(request id, prompt, sampling params)]}: the requests added right before that step.
Workload = dict[int, list[tuple[str, Any, SamplingParams]]]
# {step index: [(request id, prompt token ids, max_tokens)]}: the greedy requests added right before that step.
Arrivals = dict[int, list[tuple[str, list[int], int]]]


def ids(tokens: Sequence[int]) -> dict[str, list[int]]:
    """A prompt given as token ids."""
    return {"prompt_token_ids": list(tokens)}


def greedy(n: int, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, **kw)


def run_all(engine: Any, arrivals: Arrivals | None = None,
            before_step: Callable[[int], Any] | None = None) -> dict[str, RequestOutput]:
    """Steps the engine until every request, those already added and those arriving, has finished; returns the
    final outputs by request id. before_step(k), if given, runs right before step k (after its arrivals)."""
    arrivals = arrivals or {}
    done, k = {}, 0
    while engine.has_unfinished_requests() or any(i >= k for i in arrivals):
        for rid, prompt, n in arrivals.get(k, []):
            engine.add_request(rid, {"prompt_token_ids": prompt}, greedy(n))
        if before_step is not None:
            before_step(k)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        k += 1
    return done


def finish_order(engine: Any) -> list[str]:
    """Steps the engine until it is idle; the request ids in the order they finished."""
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    return order


def staggered(seed: int, count: int = 12) -> Arrivals:
    """`count` random prompts (1 to 90 tokens, 1 to 20 new tokens) arriving at random steps among the first 30."""
    rng = random.Random(seed)
    arrivals: Arrivals = {}
    for i in range(count):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 90))]
        arrivals.setdefault(rng.randrange(0, 30), []).append((f"r{i}", prompt, rng.randint(1, 20)))
    return arrivals


def one_by_one(prompts: Sequence[list[int]], max_tokens: Sequence[int], seed: int, prefix: str) -> Arrivals:
    """The prompts in a random order, each step taking the next one with probability 1/2; request ids are
    f"{prefix}{index}"."""
    rng = random.Random(seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    arrivals: Arrivals = {}
    k = 0
    while order:
        if rng.random() < 0.5:
            i = order.pop()
            arrivals[k] = [(f"{prefix}{i}", prompts[i], max_tokens[i])]
        k += 1
    return arrivals


@dataclasses.dataclass
class Run:
    """What `drive` saw of one run."""

    engine: Any
    final: dict[str, RequestOutput]  # the final output of every request, by id
    streamed: dict[str, list[RequestOutput]]  # the progress outputs of the streamed requests, in order
    finished_at: dict[str, int]  # the step() call that returned each final output

    @property
    def steps(self) -> int:
        """Steps the (mock) executor ran."""
        return self.engine.executor.num_steps


def drive(engine: Any, workload: Workload, before_step: Callable[[Any, int], Any] | None = None) -> Run:
    """Steps the engine until every request, added at its step, has ended; every other request streams.
    before_step(engine, k), if given, runs right before step k. Checks what must hold after any run: each request
    ended exactly once, streamed progress only grew and never ran ahead of the final output, and the KV pool (and
    swap space) is empty again."""
    run, added, k = Run(engine, {}, {}, {}), [], 0
    while engine.has_unfinished_requests() or any(i >= k for i in workload):
        assert k < 5000, "the engine never finished"
        for rid, prompt, params in workload.get(k, []):
            engine.add_request(rid, prompt, params, stream=len(added) % 2 == 0)
            added.append(rid)
        if before_step is not None:
            before_step(engine, k)
        for out in engine.step():
            assert out.request_id not in run.final, f"{out.request_id} reported after its final output"
            if out.finished:
                run.final[out.request_id], run.finished_at[out.request_id] = out, k
            else:
                run.streamed.setdefault(out.request_id, []).append(out)
        k += 1
    assert sorted(run.final) == sorted(added)
    for rid, progress in run.streamed.items():
        assert rid in added[::2], f"{rid} did not ask to stream"
        final = {c.index: c.token_ids for c in run.final[rid].outputs}
        seen = dict.fromkeys(final, 0)
        for out in progress:
            for c in out.outputs:
                assert c.token_ids == final[c.index][:len(c.token_ids)] and len(c.token_ids) >= seen[c.index], rid
                seen[c.index] = len(c.token_ids)
    assert engine.block_manager.usage == 0.0
    assert engine.block_manager.num_free_blocks == engine.executor.num_blocks
    swap = engine.scheduler.swap_space
    assert swap is None or swap.num_free_blocks == swap.num_blocks
    return run


def both(make: Callable[..., Any], workload: Workload, before_step: Callable[[Any, int], Any] | None = None
         ) -> tuple[Run, Run]:
    """The workload driven on a fresh engine `make(async_scheduling=...)`, off then on."""
    sync = drive(make(async_scheduling=False), workload, before_step)
    return sync, drive(make(async_scheduling=True), workload, before_step)


def exact_fields(out: RequestOutput) -> tuple:
    """Everything an output says but its floats and timing: error, and per completion index, token ids, text,
    finish and stop reasons, and the token ids and ranks of its log-probs."""
    return (out.error, [(c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason,
                         None if c.logprobs is None else [{t: lp.rank for t, lp in p.items()} for p in c.logprobs])
                        for c in out.outputs])


def float_fields(out: RequestOutput) -> list[float]:
    """An output's cumulative log-probs and log-probs, in order."""
    return [x for c in out.outputs
            for x in [c.cumulative_logprob or 0.0] + [lp.logprob for p in c.logprobs or [] for lp in p.values()]]


def assert_same_outputs(a: Run, b: Run, request_ids: Sequence[str] | None = None, rel: float = 0.0) -> None:
    """The two runs gave the named requests (default: all of a's) the same outputs: floats equal within `rel`,
    the rest exactly."""
    for rid in sorted(a.final) if request_ids is None else request_ids:
        assert exact_fields(b.final[rid]) == exact_fields(a.final[rid]), rid
        x, y = float_fields(a.final[rid]), float_fields(b.final[rid])
        close = len(x) == len(y) and all(math.isclose(u, v, rel_tol=rel, abs_tol=0.0) for u, v in zip(x, y))
        assert close, (rid, x, y)
