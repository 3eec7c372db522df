"""What generation returns, shaped like vLLM's RequestOutput / CompletionOutput / Logprob, plus request timings."""

from __future__ import annotations

import dataclasses
from typing import Literal

# "error": the engine failed while running the request (RequestOutput.error says why) and kept serving others.
FinishReason = Literal["stop", "length", "abort", "error"]
FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclasses.dataclass
class Logprob:
    """Log-probability of one token under the raw (pre-temperature, pre-filter) distribution, as vLLM reports.

    rank: 1 for the most likely token. decoded_token: the token's text, when the engine decodes it.
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One generated position: token id -> Logprob, holding the sampled token and the requested top tokens.
PositionLogprobs = dict[int, Logprob]


@dataclasses.dataclass
class CompletionOutput:
    """One of a request's n completions, complete or so far.

    token_ids holds every generated token, a stop token (EOS or one of stop_token_ids) included; text excludes
    the stop token's text and is cut at a matched stop string. finish_reason: None while running, then "stop"
    (EOS, stop token or stop string), "length" (max_tokens or the model's context) or "abort". stop_reason:
    the matched stop string or stop token id; None for EOS, length and abort.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None

    def __post_init__(self) -> None:
        if self.finish_reason is not None and self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be None or one of {FINISH_REASONS}, got {self.finish_reason!r}")

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock timestamps (seconds, one clock such as time.monotonic()) of a request's life.

    token_times: when each output token became available, in order. A property whose timestamps are not yet
    known is None.
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)

    def record_token(self, now: float) -> None:
        """Note that an output token became available at `now`."""
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        self.token_times.append(now)

    @property
    def ttft(self) -> float | None:
        """Time to first token: arrival to first output token."""
        return _since(self.arrival_time, self.first_token_time)

    @property
    def e2e(self) -> float | None:
        """End-to-end latency: arrival to finish."""
        return _since(self.arrival_time, self.finished_time)

    @property
    def queue_time(self) -> float | None:
        """Time waiting before the first scheduling."""
        return _since(self.arrival_time, self.first_scheduled_time)

    @property
    def itl(self) -> list[float]:
        """Inter-token latencies: the gaps between consecutive token times."""
        return [later - earlier for earlier, later in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: the mean inter-token latency (None below two tokens)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


@dataclasses.dataclass
class RequestOutput:
    """A request's prompt and its completions; `finished` once every completion has finished."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    error: str | None = None
    # SamplingParams.prompt_logprobs: per prompt position its token's log-prob and the top ones (first None).
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    # Prompt tokens served from the prefix cache, device pool or host tier (vLLM's field), when first scheduled.
    num_cached_tokens: int = 0


def _since(start: float, end: float | None) -> float | None:
    return None if end is None else end - start
