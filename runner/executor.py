"""What the engine needs from a model: run one planned step (`StepInput`) and return a sample per chunk.

`runner.model_runner.ModelRunner` is the real executor; `nexus_jax.testing.MockExecutor` a hand-computable one. A
worker process (`runner.workers.worker`) takes the same `StepInput`, pickled, and runs it on its ModelRunner.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

from runner.sampling import SamplingRow
from runner.step_batch import SeqChunk


@dataclasses.dataclass(frozen=True)
class StepInput:
    """One planned step: chunk i of decodes then prefills samples with rows[i] and never samples banned[i].

    num_steps > 1 runs that many decode steps back to back, each step's samples feeding the next (block tables
    already cover the extra positions); such a step has no prefills, log-probs or banned ids.
    """

    decodes: Sequence[SeqChunk]
    prefills: Sequence[SeqChunk]
    rows: Sequence[SamplingRow]
    num_logprobs: int = 0
    banned: Sequence[Sequence[int]] | None = None
    num_steps: int = 1

    def __post_init__(self) -> None:
        if self.num_steps > 1 and (self.prefills or self.num_logprobs or self.banned):
            raise ValueError("a multi-step decode runs decode chunks only, without log-probs or banned ids")


class Executor(Protocol):
    block_size: int
    num_blocks: int

    def execute(self, step: StepInput) -> Any:
        """With step.num_steps == 1, the sampled token per chunk (decodes, then prefills), or with
        num_logprobs > 0 a `runner.sampling.SampleResult` whose rows follow the same order; with num_steps > 1,
        the tokens [num_steps, len(decodes)]."""
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


class StepsExecutor:
    """`Executor.execute` for an executor that has a one-step `step` and a multi-step `decode_steps`
    (ModelRunner, MockExecutor): which of the two a StepInput takes is decided here once."""

    step: Callable[..., Any]  # (decodes, prefills, rows, num_logprobs, banned) -> one step's samples
    decode_steps: Callable[..., Any]  # (decodes, rows, num_steps) -> tokens [num_steps, len(decodes)]

    def execute(self, step: StepInput) -> Any:
        if step.num_steps > 1:
            return self.decode_steps(step.decodes, step.rows, step.num_steps)
        return self.step(step.decodes, step.prefills, step.rows, step.num_logprobs, step.banned)
