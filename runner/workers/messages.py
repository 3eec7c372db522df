"""What the engine sends a worker process (`runner.workers.worker`), one pickled message at a time.

The worker matches each message by its type and replies ("ok", value) or ("error", message); a message of any
other type gets an error reply, and the worker keeps serving.

The decode loop's messages (`Admit`, `Extend`, `Release`, `Expect`; see runner.workers.decode_loop) get no reply:
the loop applies them at its next step boundary and reports what it does as events, ("event", Tokens | Released |
LoopFailed), interleaved with the replies in the order they happened.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Hashable, Sequence

from runner.executor import StepInput
from runner.sampling import SamplingRow


@dataclasses.dataclass(frozen=True)
class Execute:
    """Run one planned step; the reply is the executor's result (see runner.executor.Executor.execute), sent
    once the step's K/V is in the shared pool."""
    step: StepInput


@dataclasses.dataclass(frozen=True)
class Info:
    """Describe the worker: name, pid, device, SM share, pool size, whether it is the holder."""


@dataclasses.dataclass(frozen=True)
class Stop:
    """Exit (no reply)."""


@dataclasses.dataclass(frozen=True)
class LoopRow:
    """A sequence the decode loop runs: `token` at `position` is its next input (its K/V not yet in the pool);
    `block_table` covers the positions below `limit`, the most the loop may write before an Extend; its n-th
    sample draws with `sampling.at_step(step + n)` (seeded draws do not depend on where the step ran);
    num_logprobs > 0: the top log-probs its samples report (runner.executor.StepInput.num_logprobs)."""
    seq_id: Hashable
    token: int
    position: int
    block_table: Sequence[int]
    limit: int
    sampling: SamplingRow
    step: int
    num_logprobs: int = 0


@dataclasses.dataclass(frozen=True)
class Admit:
    """Rows to add to the decode loop's batch at its next step boundary."""
    rows: Sequence[LoopRow]


@dataclasses.dataclass(frozen=True)
class Extend:
    """More room for a row: its longer block table (the old one a prefix of it) and its new limit."""
    seq_id: Hashable
    block_table: Sequence[int]
    limit: int


@dataclasses.dataclass(frozen=True)
class Release:
    """Rows to drop from the batch; `Released` says when no step of the loop will write their blocks again."""
    seq_ids: Sequence[Hashable]


@dataclasses.dataclass(frozen=True)
class Expect:
    """Whether a prefill that will join the batch (its chunk samples the prompt's first token) is in flight: while
    one is, the loop plans its queued step late, so that the Admit that follows joins it (runner.workers.handoff)."""
    joining: bool


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Event: one decode step of the loop completed (its K/V in the shared pool): row seq_ids[i] sampled
    tokens[i]; `logprobs`, when a row asked for them: (token log-probs [n], top ids [n, k], top log-probs [n, k])."""
    seq_ids: Sequence[Hashable]
    tokens: Sequence[int]
    logprobs: tuple[Any, Any, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Released:
    """Event: every step that held these rows completed; their blocks may be freed or reused."""
    seq_ids: Sequence[Hashable]


@dataclasses.dataclass(frozen=True)
class LoopFailed:
    """Event: a loop step failed; the loop stopped and holds no rows (the engine recomputes them)."""
    error: str


Message = Execute | Info | Stop | Admit | Extend | Release | Expect
LoopMessage = Admit | Extend | Release | Expect
