"""When to plan the decode step queued behind the running one, so that a finished prefill joins decode a step sooner.

The decode worker runs its steps back to back: while step n runs, step n+1 waits queued behind it, its input
tokens fed on the device from n's samples (the pipelined loop). A request whose prefill just landed can only join a
step not planned yet. Planned the moment n starts, n+1 is fixed a whole step early, so the new row waits for the
rest of n, for n+1 and for its own step: U[0, T] + 2T for a step of T. On the H200's 8B split that first gap was
20-36 ms, and it alone made the split miss a 30 ms TBT SLO that its later gaps (~15 ms) met easily
(benchmarks/RESULTS.md, 2026-12-07). Planned when n is nearly done, n+1 takes in every prefill that landed before:
the first gap becomes U[0, T] + T + lead.

So while a prefill that samples its prompt's first token is in flight (a join is coming), the queued step is
planned `lead` before the running step is predicted to end; otherwise at once, as before. Both decode loops use it:
the engine's, which plans the decode worker's steps (nexus_jax.disagg.engine), and the decode worker's own
(runner.workers.decode_loop), which the engine tells when a join is coming. The prediction: the
running step started when its predecessor landed (queued behind it) or when it was sent (the worker was idle), and
takes the median duration of the last decode steps measured that way (a median: a step that compiled, seconds
long, must not hold the next ones back). If a step lands before the queued one was
planned, the device idled between them: the lead grows; each step planned in time shrinks it a little.
"""

from __future__ import annotations

import collections
import statistics
import time
from typing import Any, Callable

# The share of a decode step by which the queued step is planned ahead of the running one's predicted end, at first.
HANDOFF_LEAD = 0.3


class HandoffTimer:
    """Decode step durations, and when to plan the step queued behind a running one (see the module doc)."""

    def __init__(self, lead: float = HANDOFF_LEAD, min_lead: float = 0.002, window: int = 8,
                 clock: Callable[[], float] = time.monotonic):
        """lead: the share of a step planned ahead of its predicted end (adapted between 0.1 and 0.9);
        min_lead: at least this many seconds ahead; window: how many recent step durations the median takes."""
        self.lead, self.min_lead, self.clock = lead, min_lead, clock
        self.durations: collections.deque[float] = collections.deque(maxlen=window)
        self.deadline: float | None = None  # a queued step waits to be planned until then
        self.counts = {"deferred": 0, "late": 0}

    def sent(self, queued: bool) -> float | None:
        """A decode step was sent; `queued` if the worker still runs another. Its start on the device: now, or
        None until the step ahead of it lands (`landed` then gives it)."""
        self.deadline = None
        return None if queued else self.clock()

    def landed(self, start: float | None) -> float:
        """A decode step that started at `start` (None: unknown) landed now; returns now, the start of the step
        queued behind it. A landing before the deadline means that step was planned too late."""
        now = self.clock()
        if start is not None and now > start:
            self.durations.append(now - start)
        if self.deadline is not None:  # the worker went idle before its next step was sent
            self.counts["late"] += 1
            self.lead = min(0.9, self.lead + 0.1)
            self.deadline = None
        return now

    @property
    def step_time(self) -> float | None:
        """The predicted duration of a decode step (None until one was measured)."""
        return statistics.median(self.durations) if self.durations else None

    def plan_at(self, running_start: float | None, join_coming: bool) -> float:
        """When to plan the step queued behind the running one: at once (0.0) unless a join is coming and the
        running step's end can be predicted; the time is kept as `deadline` for the engine's wait."""
        step = self.step_time
        if not join_coming or running_start is None or step is None:
            self.deadline = None  # the join came (or cannot be timed): nothing waits any more
            return 0.0
        at = running_start + step - max(self.min_lead, self.lead * step)
        if at <= self.clock():
            if self.deadline is not None:  # deferred, and planned in time
                self.lead = max(0.1, self.lead - 0.01)
            self.deadline = None
            return 0.0
        if self.deadline is None:
            self.counts["deferred"] += 1
        self.deadline = at
        return at

    def wait_timeout(self, poll: float) -> float:
        """How long the engine may wait for results before it must plan a deferred step."""
        if self.deadline is None:
            return poll
        return min(poll, max(0.0, self.deadline - self.clock()))

    def forget(self) -> None:
        """The decode worker's steps were dropped (a fault): nothing is deferred."""
        self.deadline = None

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "lead": round(self.lead, 3),
                "step_ms": None if self.step_time is None else round(self.step_time * 1e3, 3)}
