"""Driving an engine to the end in tests: greedy requests, arrivals spread over steps, the finished outputs."""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

from nexus_jax.core.outputs import RequestOutput
from nexus_jax.core.sampling_params import SamplingParams
from nexus_jax.testing.engines import VOCAB

# {step index: [(request id, prompt token ids, max_tokens)]}: the greedy requests added right before that step.
Arrivals = dict[int, list[tuple[str, list[int], int]]]


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
