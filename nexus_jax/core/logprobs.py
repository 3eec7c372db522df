"""The sampler's log-prob tables turned into vLLM's per-position dicts: for generated tokens (logprobs) and for
prompt tokens (prompt_logprobs, computed as the prompt's chunks run)."""

from __future__ import annotations

from typing import Callable, Sequence

from nexus_jax.core.outputs import Logprob, PositionLogprobs
from nexus_jax.core.request import Request

TokenText = Callable[[int], "str | None"]


def position_logprobs(token: int, token_logprob: float, top_ids: Sequence[int], top_logprobs: Sequence[float],
                      num: int, text: TokenText, token_rank: int | None = None) -> PositionLogprobs:
    """The top `num` tokens with their ranks, plus `token` (with token_rank, None: unknown) when it is not among
    them."""
    entry = {int(t): Logprob(float(lp), rank=r + 1, decoded_token=text(int(t)))
             for r, (t, lp) in enumerate(zip(top_ids[:num], top_logprobs[:num]))}
    if token not in entry:
        entry[token] = Logprob(float(token_logprob), rank=token_rank, decoded_token=text(token))
    return entry


def prompt_targets(seq: Request, start: int, num_tokens: int) -> tuple[int, int, list[int]] | None:
    """What a chunk running tokens [start, start + num_tokens) of `seq` reports for prompt_logprobs: (top count,
    the chunk's first logits row wanted, the prompt tokens those rows predict), or None. Position q's log-prob
    comes from the logits at q - 1; positions already recorded (before a preemption's recompute) are skipped."""
    if seq.prompt_logprobs is None:
        return None
    first = max(start + 1, len(seq.prompt_logprobs))
    last = min(start + num_tokens, seq.num_prompt_tokens - 1)
    if first > last:
        return None
    return seq.params.prompt_logprobs, first - 1 - start, seq.prompt_token_ids[first:last + 1]


def record_prompt_logprobs(seq: Request, start: int, num_tokens: int, table: tuple, text: TokenText) -> None:
    """Files a chunk's prompt log-probs (the runner's (token log-probs, their ranks, top ids, top log-probs) of its
    prompt_targets rows) at their positions."""
    token_logprobs, ranks, top_ids, top_logprobs = table
    last = min(start + num_tokens, seq.num_prompt_tokens - 1)
    first = last - len(token_logprobs) + 1
    recorded = seq.prompt_logprobs
    for j in range(len(token_logprobs)):
        q = first + j
        entry = position_logprobs(seq.prompt_token_ids[q], token_logprobs[j], top_ids[j], top_logprobs[j],
                                  seq.params.prompt_logprobs, text, int(ranks[j]))
        if q < len(recorded):
            recorded[q] = entry  # computed again (a chunk that ran beside a preemption)
        elif q == len(recorded):
            recorded.append(entry)
