"""Per-sequence state on the host: tokens, progress through the KV pool, text, status and timings.

Progress is one number, `num_computed_tokens` (tokens whose K/V is in the pool), as in vLLM v1: a step runs the
tokens between it and `num_tokens`; when a step reaches `num_tokens` the model's sample is appended. A prefill,
a chunk of one, a decode and a recompute after preemption are all the same operation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from nexus_jax.core.outputs import CompletionOutput, PositionLogprobs, RequestMetrics
from nexus_jax.core.sampling_params import SamplingParams
from nexus_jax.core.stop import StopChecker
from runner.sampling import SamplingRow


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One sequence: a whole request when n == 1, else one of its n completions (sharing the prompt)."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams          # this sequence's own (n == 1, seed set)
    sampling_row: SamplingRow       # params as the device sampler's row at step 0, validated once (see to_row)
    stop: StopChecker
    metrics: RequestMetrics
    priority: int = 0               # lower runs first under the priority policy (vLLM's convention)
    group_id: str = ""              # the user's request id (request_id differs when n > 1)
    index: int = 0                  # which of the parent request's n completions this is
    program_id: str | None = None   # the agentic program of this call; None: a one-call program
    thread_id: str = ""             # tells parallel calls of one program apart
    output_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # Set while another sequence computes the shared prompt; this one then starts from the prefix cache.
    waits_for: "Request | None" = None
    # Prompt then output, kept as one list because the scheduler and block manager read it every step.
    all_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = self.prompt_token_ids + self.output_token_ids

    def append_token(self, token: int) -> None:
        self.output_token_ids.append(token)
        self.all_token_ids.append(token)

    @property
    def arrival_time(self) -> float:
        return self.metrics.arrival_time

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def remaining_tokens(self) -> int:
        """Tokens this sequence may still generate (max_tokens, or what the context leaves)."""
        return self.stop.max_tokens - len(self.output_token_ids)

    @property
    def in_prefill(self) -> bool:
        """True while more than one known token still lacks K/V (a prompt, or a recompute after preemption)."""
        return self.num_tokens - self.num_computed_tokens > 1

    def finish(self, reason: str, stop_reason: int | str | None, now: float) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.metrics.finished_time = now

    def completion(self) -> CompletionOutput:
        # Copies: outputs cross to other threads (AsyncLLM) while the engine keeps appending.
        return CompletionOutput(self.index, self.text, list(self.output_token_ids), self.cumulative_logprob,
                                None if self.logprobs is None else list(self.logprobs), self.finish_reason,
                                self.stop_reason)
