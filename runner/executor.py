"""What the engine needs from a model: run one planned step (`StepInput`) and return a sample per chunk.

`runner.model_runner.ModelRunner` is the real executor; `nexus_jax.testing.MockExecutor` a hand-computable one. A
worker process (`runner.workers.worker`) takes the same `StepInput`, pickled, and runs it on its ModelRunner.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from runner.penalties import PenaltyRow
from runner.sampling import SamplingRow
from runner.step_batch import SeqChunk


@dataclasses.dataclass(frozen=True)
class StepInput:
    """One planned step: chunk i of decodes then prefills samples with rows[i], adds bias[i] (token id -> value)
    to its logits, applies penalties[i] (runner.penalties), samples only among the ids allowed[i] allows (a packed
    bitmask, runner.sampling.token_mask; None: any) and never samples banned[i].

    prompt_logprobs[i] = (k, first, targets) asks for the log-probs of chunk i's logits rows first, first + 1, ...
    (its tokens' positions from start_pos), each row's of its target token and its top k; they come back in the
    SampleResult's prompt_logprobs[i] as (target log-probs [n], their ranks [n], top ids [n, k], top log-probs
    [n, k]).

    num_steps > 1 runs that many decode steps back to back, each step's samples feeding the next (block tables
    already cover the extra positions); such a step has no prefills, log-probs, biases or banned ids.

    feed (the overlapped loop, see `Executor.dispatch`): pairs (i, r): decode chunk i's token is the sample of
    chunk r of the step dispatched just before this one (of its last step, when that one ran several), still on
    the device; its token_ids hold a placeholder.

    late (executors with `takes_late_limits`): called once the forward pass is dispatched, returns (banned,
    allowed) in place of those fields: ids that depend on the samples of the step in flight (a grammar, bad
    words), which the caller learns while this step's forward pass runs (vLLM computes grammar bitmasks so).
    """

    decodes: Sequence[SeqChunk]
    prefills: Sequence[SeqChunk]
    rows: Sequence[SamplingRow]
    num_logprobs: int = 0
    banned: Sequence[Sequence[int]] | None = None
    num_steps: int = 1
    feed: Sequence[tuple[int, int]] = ()
    bias: Sequence[Mapping[int, float] | None] | None = None
    penalties: Sequence[PenaltyRow | None] | None = None
    allowed: Sequence[np.ndarray | None] | None = None
    prompt_logprobs: Sequence[tuple[int, int, Sequence[int]] | None] | None = None
    late: Callable[[], tuple[Any, Any]] | None = None

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.num_steps > 1 and (self.prefills or self.num_logprobs or self.banned or self.bias or self.penalties
                                   or self.allowed or self.prompt_logprobs or self.late):
            raise ValueError("a multi-step decode runs decode chunks only, without log-probs, banned or allowed "
                             "ids, biases, penalties or prompt log-probs")
        if any(not 0 <= i < len(self.decodes) or r < 0 for i, r in self.feed):
            raise ValueError(f"feed pairs name decode chunks (0..{len(self.decodes) - 1}) and earlier rows, "
                             f"got {list(self.feed)}")


class StepHandle(Protocol):
    def result(self) -> Any:
        """Waits for the step and returns what `Executor.execute` would have."""
        ...


class Executor(Protocol):
    block_size: int
    num_blocks: int

    def execute(self, step: StepInput) -> Any:
        """With step.num_steps == 1, the sampled token per chunk (decodes, then prefills), or with
        num_logprobs > 0 a `runner.sampling.SampleResult` whose rows follow the same order; with num_steps > 1,
        the tokens [num_steps, len(decodes)]."""
        ...

    def dispatch(self, step: StepInput) -> StepHandle:
        """Starts a step (of one or several decode steps) without waiting for it (the overlapped loop): the caller
        plans the next step, whose `feed` may name this step's samples, before it reads this one's `result()`.
        Steps run in the order they were dispatched."""
        ...

    # Swap preemption (EngineConfig.preemption_mode "swap") and the prefix cache's host tier (host_cache_gib):
    block_bytes: int  # host bytes one KV block takes

    def allocate_swap_space(self, num_blocks: int, run_from: int = 0, run: int = 1) -> None:
        """Sets aside host memory for num_blocks KV blocks. From block `run_from` on they come in aligned runs of
        `run` blocks (nexus_jax.core.host_runs): the blocks of a run written by one call are kept as one array."""
        ...

    def swap_blocks(self, swap_out: Sequence[tuple[int, int]], swap_in: Sequence[tuple[int, int]]) -> None:
        """Copies (device, host) block pairs to host memory and (host, device) pairs back, before the next step.
        The swap-in data is read before the swap-out data is written, and the swap-out blocks are read before the
        swap-in blocks are written, so a block released by one may be reused by the other in the same call."""
        ...


class ReadyStep:
    """The handle of a step that already ran (the synchronous loop)."""

    def __init__(self, value: Any):
        self.value = value

    def result(self) -> Any:
        return self.value


class StepsExecutor:
    """`Executor.execute` and multi-step decodes for an executor that dispatches steps (`dispatch`): ModelRunner,
    MockExecutor. `step` is the synchronous single step, which the synchronous loop goes through (tests and
    benchmarks wrap it to observe steps)."""

    dispatch: Callable[[StepInput], StepHandle]
    takes_late_limits = True  # calls StepInput.late between its forward pass and its sampling

    def step(self, decodes: Sequence[SeqChunk], prefills: Sequence[SeqChunk], sampling_rows: Sequence[SamplingRow],
             num_logprobs: int = 0, banned: Sequence[Sequence[int]] | None = None,
             bias: Sequence[Mapping[int, float] | None] | None = None,
             penalties: Sequence[PenaltyRow | None] | None = None,
             allowed: Sequence[np.ndarray | None] | None = None,
             prompt_logprobs: Sequence[tuple[int, int, Sequence[int]] | None] | None = None) -> Any:
        """Runs one step and returns the sample of each chunk, decodes first, then prefills."""
        return self.dispatch(StepInput(decodes, prefills, sampling_rows, num_logprobs, banned, bias=bias,
                                       penalties=penalties, allowed=allowed,
                                       prompt_logprobs=prompt_logprobs)).result()

    def decode_steps(self, decodes: Sequence[SeqChunk], sampling_rows: Sequence[SamplingRow],
                     num_steps: int) -> Any:
        """Runs num_steps decode steps without returning to the host; the tokens [num_steps, len(decodes)]. Each
        block table must already cover start_pos + num_steps tokens."""
        return self.dispatch(StepInput(decodes, [], sampling_rows, num_steps=num_steps)).result()

    def execute(self, step: StepInput) -> Any:
        if step.num_steps > 1 or step.feed or step.late:
            return self.dispatch(step).result()
        return self.step(step.decodes, step.prefills, step.rows, step.num_logprobs, step.banned, bias=step.bias,
                         penalties=step.penalties, allowed=step.allowed, prompt_logprobs=step.prompt_logprobs)
