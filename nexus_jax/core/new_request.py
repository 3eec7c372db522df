"""A new request's validation and its sequences (one per completion, n of them), built off the engine thread."""

from __future__ import annotations

import random
import time
from typing import Any, Protocol, Sequence

from nexus_jax.core.config import EngineConfig
from nexus_jax.core.constraints import ConstraintFactory
from nexus_jax.core.outputs import RequestMetrics
from nexus_jax.core.prompts import prompt_ids
from nexus_jax.core.request import Request, RequestGroup, check_ids
from nexus_jax.core.sampling_params import SamplingParams
from nexus_jax.core.stop import TokenStop
from runner.penalties import PenaltyHistory


class Admits(Protocol):
    """What of the engine a new request is checked against (LLMEngine has all of it)."""
    config: EngineConfig
    tokenizer: Any
    vocab_size: int
    max_model_len: int
    eos_token_ids: Sequence[int]
    constraints: ConstraintFactory
    seed_rng: random.Random


def build_group(engine: Admits, request_id: str, prompt: str | dict[str, Any], params: SamplingParams | None, *,
                priority: int, arrival_time: float | None, stream: bool, program_id: str | None,
                thread_id: str) -> RequestGroup:
    """Validates a request for `engine` and builds its sequences; raises ValueError (or TypeError) on bad input.
    Touches no engine state but its seed generator (engine.seed_rng)."""
    check_ids(request_id, priority, program_id, thread_id)
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
    text, ids = prompt_ids(prompt, engine.tokenizer, engine.vocab_size, engine.max_model_len)
    room = engine.max_model_len - len(ids)
    if room < 1:
        raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the model's context of "
                         f"{engine.max_model_len} tokens")
    if params.max_tokens is not None and params.max_tokens > room:
        raise ValueError(f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} exceeds the model's "
                         f"context of {engine.max_model_len} tokens")
    if params.stop and engine.tokenizer is None:
        raise ValueError("stop strings need a tokenizer, and this model has none")
    # Each of the n sequences is built right here: an unbounded n would stall the caller and fill memory.
    if params.n > engine.config.max_num_seqs:
        raise ValueError(f"n {params.n} exceeds max_num_seqs {engine.config.max_num_seqs}, the most sequences "
                         f"the engine runs at once")
    for name, named in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or ()),
                        ("allowed_token_ids", params.allowed_token_ids or ())):
        bad = [t for t in named if t >= engine.vocab_size]
        if bad:  # the sampler's id tables hold vocabulary ids only
            raise ValueError(f"{name} names token ids outside the vocabulary [0, {engine.vocab_size}): {bad[:5]}")
    make_constraints = engine.constraints.prepare(params)  # compiles a grammar here, off the engine thread
    metrics = RequestMetrics(time.monotonic() if arrival_time is None else arrival_time)
    drawn = engine.seed_rng.getrandbits(31)
    eos = () if params.ignore_eos else engine.eos_token_ids
    banned = list(dict.fromkeys([*eos, *params.stop_token_ids])) if params.min_tokens else []
    seqs: list[Request] = []
    for i in range(params.n):
        child = params.clone_for_child(i, drawn)
        seq = Request(request_id if params.n == 1 else f"{request_id}#{i}", ids, child,
                      child.to_row(child.seed),
                      TokenStop(child, engine.eos_token_ids, max_new_tokens=room),
                      metrics if i == 0 else RequestMetrics(metrics.arrival_time), priority,
                      group_id=request_id, index=i, program_id=program_id,
                      thread_id=thread_id if params.n == 1 else f"{thread_id}#{i}",
                      waits_for=seqs[0] if i else None, banned_ids=banned, constraints=make_constraints(),
                      prompt_logprobs=[None] if child.prompt_logprobs is not None and not i else None,
                      penalty=PenaltyHistory(child.repetition_penalty, child.frequency_penalty,
                                             child.presence_penalty, ids) if child.has_penalties else None)
        seqs.append(seq)
    return RequestGroup(request_id, text, ids, seqs, stream)
