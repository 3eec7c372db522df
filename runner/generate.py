"""A plain generation loop over `ModelRunner`: every prompt is admitted at once, prompt chunks run in the same steps
as other sequences' decodes. It has no scheduler, preemption or prefix cache (the engine in `nexus_jax` adds them);
it is the smallest driver that exercises the prefill, decode and mixed steps end to end.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from runner.model_runner import ModelRunner
from runner.sampling import GREEDY_ROW, SamplingRow
from runner.step_batch import SeqChunk


@dataclasses.dataclass
class _Seq:
    prompt_len: int
    tokens: list[int]
    max_new_tokens: int
    sampling: SamplingRow
    blocks: list[int] = dataclasses.field(default_factory=list)
    cached: int = 0
    done: bool = False

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]


def generate(runner: ModelRunner, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             sampling: SamplingRow = GREEDY_ROW, prefill_chunk: int | None = None,
             eos_token_ids: Sequence[int] = ()) -> list[list[int]]:
    """Generates up to `max_new_tokens` tokens per prompt; greedy unless `sampling` (a row made by
    `SamplingRow.validated`) says otherwise."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if prefill_chunk is not None and prefill_chunk <= 0:
        raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
    limit = runner.config.max_position_embeddings
    seqs = []
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if len(p) + max_new_tokens > limit:
            raise ValueError(f"prompt {i}: {len(p)} tokens + {max_new_tokens} new exceed the context of {limit}")
        seqs.append(_Seq(len(p), list(p), max_new_tokens, sampling))
    free = list(range(runner.num_blocks - 1, -1, -1))
    eos = set(eos_token_ids)

    def chunk_of(s: _Seq, n: int) -> SeqChunk:
        need = -(-(s.cached + n) // runner.block_size) - len(s.blocks)
        if need > len(free):
            raise RuntimeError(f"KV pool of {runner.num_blocks} blocks is too small for this batch")
        s.blocks.extend(free.pop() for _ in range(need))
        return SeqChunk(s.tokens[s.cached:s.cached + n], s.cached, list(s.blocks))

    while True:
        live = [s for s in seqs if not s.done]
        if not live:
            return [s.generated for s in seqs]
        decoding = [s for s in live if s.cached >= s.prompt_len]
        prefilling = [s for s in live if s.cached < s.prompt_len]
        decodes = [chunk_of(s, 1) for s in decoding]
        prefills = [chunk_of(s, min(prefill_chunk or s.prompt_len, s.prompt_len - s.cached)) for s in prefilling]
        rows = [s.sampling.at_step(len(s.generated)) for s in decoding + prefilling]
        out = runner.step(decodes, prefills, rows)
        for s, c, tok in zip(decoding + prefilling, decodes + prefills, out):
            s.cached += len(c.token_ids)
            if s.cached < s.prompt_len:
                continue  # mid-prompt chunk: its sample is meaningless
            s.tokens.append(int(tok))
            if len(s.generated) >= s.max_new_tokens or int(tok) in eos:
                s.done = True
                free.extend(s.blocks)
