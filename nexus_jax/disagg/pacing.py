"""Pacing the split's first token: a stream gets it when the decode step that samples its second token starts.

In the split, the prefill worker samples a prompt's first token and the request then joins the decode worker's
next step that is still to be planned. The running decode step ends anywhere in the next T (one decode step), and
the step the request joins takes another T, so sent at once the first token is followed by a gap of U[0, T] + T
and more (the step queued behind the running one was often planned already): on the tight workload (TBT 30 ms) it
was every TBT miss of the split (RESULTS.md, 2026-12-07). Withheld until that step starts, the first token moves
the wait into TTFT (under a step; the SLO there is seconds) and the gap to the second token is one step.

Only a processor that streams on its own thread withholds (`OutputProcessor.paces`); every withheld token goes out
at the latest after `limit` seconds, before any later event of its request (a token, an abort, an error).
"""

from __future__ import annotations

from typing import Iterable

from nexus_jax.core.output_processor import OutputProcessor
from nexus_jax.core.request import RequestGroup

PACE_LIMIT = 0.1  # seconds a first token waits at most: a decode step is ~5-20 ms; a stalled one is not waited for


class FirstTokenPacer:
    def __init__(self, enabled: bool, limit: float = PACE_LIMIT):
        self.enabled = enabled
        self.limit = limit
        self.held: dict[RequestGroup, float] = {}  # group -> when its first token was withheld
        self.counts = {"paced": 0, "at_step_start": 0, "at_limit": 0}
        self.held_seconds = 0.0  # summed over released first tokens: what pacing added to TTFT

    def hold(self, output: OutputProcessor, groups: Iterable[RequestGroup], now: float) -> None:
        """Withholds the first tokens about to be folded for `groups` (streams still running after them)."""
        if not (self.enabled and output.paces):
            return
        groups = [g for g in groups if g.stream]
        output.hold(groups)
        for group in groups:
            self.held[group] = now

    def folded(self) -> None:
        """After the fold: a request that ended at its first token was not withheld (its end went out)."""
        for group in [g for g in self.held if g.finished]:
            del self.held[group]

    def start(self, output: OutputProcessor, groups: Iterable[RequestGroup | None], now: float) -> bool:
        """The decode step of `groups` starts: their first tokens go out; True if any did (flush them)."""
        released = False
        for group in groups:
            since = self.held.pop(group, None) if group is not None else None
            if since is not None:
                self._release(output, group, since, now, "at_step_start")
                released = True
        return released

    def expire(self, output: OutputProcessor, now: float) -> bool:
        """Releases the first tokens withheld for `limit` seconds (the step they wait for is late or never comes,
        after a preemption or a worker's fault); True if any went out."""
        late = [(g, since) for g, since in self.held.items() if now - since >= self.limit]
        for group, since in late:
            del self.held[group]
            self._release(output, group, since, now, "at_limit")
        return bool(late)

    def _release(self, output: OutputProcessor, group: RequestGroup, since: float, now: float, why: str) -> None:
        output.release(group, now)
        self.counts["paced"] += 1
        self.counts[why] += 1
        self.held_seconds += now - since

    def stats(self) -> dict[str, float]:
        paced = self.counts["paced"]
        return {**self.counts, "held": len(self.held),
                "mean_hold_ms": 1e3 * self.held_seconds / paced if paced else 0.0}
