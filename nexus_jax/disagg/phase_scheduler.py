"""Separate prefill and decode plans for the disaggregated mode (Nexus): the two run at the same time on their
own SM partitions, so each plan only takes requests that are not already in a step still executing.

Prefill order is the scheduler's `prefill_order` (by default shortest-remaining-prompt-first with aging, as Nexus
does). Decodes run in policy order; a decode-only plan
may run several steps back to back whatever waits, since waiting prompts go to the prefill partition instead.
"""

from __future__ import annotations

from nexus_jax.core.request import Request, RequestStatus
from nexus_jax.core.scheduler import ScheduledChunk, Scheduler, SchedulerOutput


class PhaseScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("prefill_order", "spf")
        super().__init__(*args, **kwargs)
        self.waiting_joins_decodes = False
        self.preempt_in_flight = False
        self._planning_prefill = False

    def waiting_prompts(self, now: float) -> list[tuple[int, float]]:
        """(prompt tokens left, seconds waited) of each request before its first token, in prefill order: the
        queue whose TTFT the partition controller predicts."""
        before_first = [r for r in (*self.running, *self.waiting) if r.in_prefill and not r.output_token_ids]
        return [(r.num_tokens - r.num_planned_computed, now - r.arrival_time)
                for r in sorted(before_first, key=self.admission_key)]

    def idle_requests(self) -> list[Request]:
        return [r for r in self.running if r.request_id not in self.busy]

    def schedule_decode(self, ahead: SchedulerOutput | None = None) -> SchedulerOutput:
        """A decode-only plan over the running requests past their prompt that no executing step holds.

        ahead: the decode step in flight on the worker this plan goes to (the pipelined decode loop): its
        requests are planned one token further, their input fed on the device from its samples."""
        out = SchedulerOutput([], [], [])
        flying = {id(c.request): c.request for c in ahead.decodes} if ahead is not None else {}
        order = sorted([*self.idle_requests(), *flying.values()], key=self.policy)
        planned: set[int] = set()
        for req in order:
            if req.in_prefill or req.status is not RequestStatus.RUNNING or len(out.decodes) >= self.max_num_seqs:
                continue
            if req.remaining_tokens <= 0:
                continue  # the step in flight draws its last token
            if (id(req) in flying or req.num_pending) and self.needs_last_token(req):
                continue  # planned once its sample in flight is on the host
            if not self._allocate_or_preempt(req, 1, order, planned, out):
                continue
            planned.add(id(req))
            self._plan(out, req, 1)
        out.num_steps = self._decode_steps(out)
        self._hold(out)
        return out

    def schedule_prefill(self, budget: int | None = None) -> SchedulerOutput:
        """A prefill-only plan: prompt chunks of running requests first, then admissions, within `budget` tokens
        (default max_num_batched_tokens)."""
        budget = self.max_num_batched_tokens if budget is None else budget
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
        chunk = ScheduledChunk(req, req.num_planned_computed, n)
        # a one-token prompt remainder is still prefill work
        (out.prefills if self._planning_prefill or n > 1 else out.decodes).append(chunk)

    def _hold(self, out: SchedulerOutput) -> None:
        self.busy.update(c.request.request_id for c in out.chunks)
