"""Separate prefill and decode plans for the disaggregated mode (Nexus): the two run at the same time on their
own SM partitions, so each plan only takes requests that are not already in a step still executing.

Prefill order is shortest-remaining-prompt-first with aging, `remaining_prompt_tokens - gamma * waited_seconds`,
so short prompts get their first token quickly and a long prompt's score falls until it runs: it cannot starve.
Program-aware policies rank first, with that score breaking ties. Decodes run in policy order; a decode-only plan
may run several steps back to back whatever waits, since waiting prompts go to the prefill partition instead.
"""

from __future__ import annotations

import time

from nexus_jax.core.request import Request, RequestStatus
from nexus_jax.core.scheduler import ScheduledChunk, Scheduler, SchedulerOutput


class PhaseScheduler(Scheduler):
    def __init__(self, *args, prefill_aging: float = 15.0, **kwargs):
        super().__init__(*args, **kwargs)
        if prefill_aging < 0:
            raise ValueError(f"prefill_aging must be >= 0, got {prefill_aging}")
        self.prefill_aging = prefill_aging
        self.waiting_joins_decodes = False
        self._planning_prefill = False

    def admission_key(self, req: Request) -> tuple:
        waited = time.monotonic() - req.arrival_time
        score = (req.num_tokens - req.num_computed_tokens) - self.prefill_aging * waited
        # Every policy but FCFS ranks first (priority, program service); FCFS is Nexus's shortest-prompt-first.
        return (*self.policy(req), score) if self.policy_name != "fcfs" else (score, req.arrival_time)

    def idle_requests(self) -> list[Request]:
        return [r for r in self.running if r.request_id not in self.busy]

    def schedule_decode(self) -> SchedulerOutput:
        """A decode-only plan over the running requests past their prompt that no executing step holds."""
        out = SchedulerOutput([], [], [])
        order = sorted(self.idle_requests(), key=self.policy)
        planned: set[int] = set()
        for req in order:
            if req.in_prefill or req.status is not RequestStatus.RUNNING or len(out.decodes) >= self.max_num_seqs:
                continue
            if not self._allocate_or_preempt(req, 1, order, planned, out):
                continue
            planned.add(id(req))
            self._plan(out, req, 1)
        out.num_steps = self._decode_steps(out)
        self._hold(out)
        return out

    def schedule_prefill(self) -> SchedulerOutput:
        """A prefill-only plan: prompt chunks of running requests first, then admissions, within the budget."""
        budget = self.max_num_batched_tokens
        out = SchedulerOutput([], [], [])
        order = sorted([r for r in self.idle_requests() if r.in_prefill], key=self.admission_key)
        victims = sorted(self.idle_requests(), key=self.policy)
        planned: set[int] = set()
        for req in order:
            if budget == 0 or len(out.prefills) >= self.max_prefill_seqs:
                break
            if req.status is not RequestStatus.RUNNING:
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._allocate_or_preempt(req, n, victims, planned, out):
                continue
            planned.add(id(req))
            out.prefills.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n
        if not out.preempted:
            self._planning_prefill = True
            try:
                self._admit(budget, out)
            finally:
                self._planning_prefill = False
        self._hold(out)
        return out

    def schedule(self) -> SchedulerOutput:
        """An aggregated (mixed) plan; only valid while no step is executing."""
        if self.busy:
            raise RuntimeError("an aggregated step cannot be planned while steps are executing")
        out = super().schedule()
        self._hold(out)
        return out

    def _plan(self, out: SchedulerOutput, req: Request, n: int) -> None:
        if self._planning_prefill or n > 1:  # a one-token prompt remainder is still prefill work
            out.prefills.append(ScheduledChunk(req, req.num_computed_tokens, n))
        else:
            out.decodes.append(ScheduledChunk(req, req.num_computed_tokens, n))

    def _hold(self, out: SchedulerOutput) -> None:
        self.busy.update(c.request.request_id for c in out.chunks)
