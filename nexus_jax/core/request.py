"""Per-sequence state on the host: tokens, progress through the KV pool, status and timings (the text and the
outputs are the output processor's, nexus_jax.core.output_processor).

Progress is one number, `num_computed_tokens` (tokens whose K/V is in the pool), as in vLLM v1: a step runs the
tokens between it and `num_tokens`; when a step reaches `num_tokens` the model's sample is appended. A prefill,
a chunk of one, a decode and a recompute after preemption are all the same operation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from nexus_jax.core.constraints import TokenConstraints
from nexus_jax.core.outputs import PositionLogprobs, RequestMetrics
from nexus_jax.core.sampling_params import SamplingParams
from nexus_jax.core.stop import TokenStop
from runner.penalties import PenaltyHistory
from runner.sampling import SamplingRow

# The longest request, program or thread id the engine takes: ids are held for a request's life (a program's for its
# idle timeout) and echoed in every output, so an unbounded one would pin as much memory as its sender likes.
MAX_ID_LENGTH = 1024


def check_id_length(name: str, value: str, limit: int = MAX_ID_LENGTH, setting: str = "MAX_ID_LENGTH") -> None:
    """Raises ValueError naming `setting` when the id `value` is longer than `limit` characters."""
    if len(value) > limit:
        raise ValueError(f"{name} of {len(value)} characters exceeds the limit of {limit} ({setting})")


def check_ids(request_id: str, priority: int, program_id: str | None, thread_id: str) -> None:
    """Raises ValueError on a request's malformed request id, priority, program id or thread id."""
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority must be an integer, got {priority!r}")
    if program_id is not None and (not isinstance(program_id, str) or not program_id):
        raise ValueError(f"program_id must be a non-empty string or None, got {program_id!r}")
    if not isinstance(thread_id, str):
        raise ValueError(f"thread_id must be a string, got {thread_id!r}")
    for name, value in (("request_id", request_id), ("program_id", program_id or ""), ("thread_id", thread_id)):
        check_id_length(name, value)


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
    stop: TokenStop
    metrics: RequestMetrics
    priority: int = 0               # lower runs first under the priority policy (vLLM's convention)
    group_id: str = ""              # the user's request id (request_id differs when n > 1)
    index: int = 0                  # which of the parent request's n completions this is
    program_id: str | None = None   # the agentic program of this call; None: a one-call program
    thread_id: str = ""             # tells parallel calls of one program apart
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # The overlapped loop: tokens whose K/V the step in flight computes, and samples it draws for this sequence
    # (on the device until the step is folded). Both 0 in the synchronous loop whenever a step is planned.
    num_inflight: int = 0
    num_pending: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0      # prompt tokens served from the prefix cache (device or host) at admission
    # The ids it may not sample until min_tokens are out (EOS and stop ids, once each): built once, since the
    # engine hands it to every step in that stretch.
    banned_ids: list[int] = field(default_factory=list)
    # The distinct tokens of prompt and output with their output counts, for penalties; None without penalties.
    penalty: PenaltyHistory | None = None
    # allowed ids, bad words, grammar (nexus_jax.core.constraints); None when the request sets none of them.
    constraints: TokenConstraints | None = None
    # Per prompt position the log-probs prompt_logprobs asked for, filled as the prompt's chunks run (the first
    # position None); None when not asked for.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    # Set while another sequence computes the shared prompt; this one then starts from the prefix cache.
    waits_for: "Request | None" = None
    # Prompt then output, kept as one list because the scheduler and block manager read it every step.
    all_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = self.prompt_token_ids + self.output_token_ids

    def append_token(self, token: int) -> None:
        self.output_token_ids.append(token)
        self.all_token_ids.append(token)
        if self.penalty is not None:
            self.penalty.add(token)
        if self.constraints is not None:
            self.constraints.accept(token)

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
    def num_planned_tokens(self) -> int:
        """Known tokens plus the samples still in flight: what the next step is planned against."""
        return len(self.all_token_ids) + self.num_pending

    @property
    def num_planned_computed(self) -> int:
        """Tokens with K/V in the pool once the step in flight is done."""
        return self.num_computed_tokens + self.num_inflight

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def remaining_tokens(self) -> int:
        """Tokens this sequence may still generate (max_tokens, or what the context leaves), samples in flight
        counted as generated."""
        return self.stop.max_tokens - len(self.output_token_ids) - self.num_pending

    @property
    def in_prefill(self) -> bool:
        """True while more than one token still lacks K/V (a prompt, or a recompute after preemption)."""
        return self.num_planned_tokens - self.num_planned_computed > 1

    def finish(self, reason: str, stop_reason: int | str | None, now: float) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.metrics.finished_time = now


class RequestGroup:
    """A user request: its prompt and its n sequences."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], seqs: list[Request],
                 stream: bool):
        self.request_id = request_id
        self.stream = stream  # report progress every step, not only the final output
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.seqs = seqs
        self.error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
