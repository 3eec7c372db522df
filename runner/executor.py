"""What the engine needs from a model: run one planned step and return a sample per chunk.

`runner.model_runner.ModelRunner` is the real executor; `nexus_jax.testing.MockExecutor` a hand-computable one.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from runner.step_batch import SeqChunk


class Executor(Protocol):
    block_size: int
    num_blocks: int

    def step(self, decodes: Sequence[SeqChunk], prefills: Sequence[SeqChunk], sampling_rows: Sequence[tuple],
             num_logprobs: int = 0, banned: Sequence[Sequence[int]] | None = None):
        """Returns the sampled token per chunk (decodes, then prefills), never one of banned[i] for chunk i; with
        num_logprobs > 0, a `runner.sampling.SampleResult` whose rows follow the same order."""
        ...

    def decode_steps(self, decodes: Sequence[SeqChunk], sampling_rows: Sequence[tuple], num_steps: int):
        """Runs num_steps decode steps back to back, each step's samples feeding the next; returns the tokens
        [num_steps, len(decodes)]. Block tables already cover the extra positions."""
        ...

    # Swap preemption only (EngineConfig.preemption_mode "swap"):
    block_bytes: int  # host bytes one KV block takes

    def allocate_swap_space(self, num_blocks: int) -> None:
        """Sets aside host memory for num_blocks KV blocks."""
        ...

    def swap_blocks(self, swap_out: Sequence[tuple[int, int]], swap_in: Sequence[tuple[int, int]]) -> None:
        """Copies (device, host) block pairs to host memory and (host, device) pairs back, before the next step.
        The swap-in data is read before the swap-out data is written, and the swap-out blocks are read before the
        swap-in blocks are written, so a block released by one may be reused by the other in the same call."""
        ...
