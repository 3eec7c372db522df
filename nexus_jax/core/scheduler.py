"""The aggregated-mode scheduler: continuous batching with chunked prefill (vLLM style).

Each step has a token budget. Running sequences come first in policy order (those decoding, then those part-way
through a prompt), then waiting sequences are admitted while budget, sequence slots and KV blocks last. When a
running sequence needs a block and none is free, the lowest-priority running sequence not yet in this step's plan
is preempted. By recompute, its blocks are freed and it waits again with nothing computed (its full blocks usually
survive in the prefix cache, so the recompute is often short). By swap (with a swap space, while it has room), its
computed blocks are copied to host memory first and it keeps its progress: when it is admitted again (in policy
order, like any waiting request) its blocks are copied back, those still in the prefix cache excepted.

The scheduler works on host state only and returns a plan; `update` folds the executed plan back.
"""

from __future__ import annotations

import collections
import dataclasses
import time

from nexus_jax.core.block_manager import BlockManager
from nexus_jax.core.host_cache import HostCache
from nexus_jax.core.request import Request, RequestStatus
from nexus_jax.core.swap_space import SwapSpace
from nexus_jax.programs.policies import PROGRAM_POLICIES, REQUEST_ORDERS, SCHEDULING_POLICIES, make_policy
from nexus_jax.programs.table import Call, ProgramConfig


@dataclasses.dataclass
class ScheduledChunk:
    request: Request
    start: int        # tokens of the request in the KV pool when this chunk runs
    num_tokens: int   # tokens this step computes
    # Whether the chunk reaches the request's last token as planned, so its sample becomes the next token. Fixed
    # when planned: with a step in flight the request's token count changes before this chunk is folded.
    samples: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_tokens == self.request.num_planned_tokens


@dataclasses.dataclass
class SchedulerOutput:
    decodes: list[ScheduledChunk]     # one token each
    prefills: list[ScheduledChunk]    # several tokens each
    preempted: list[Request]
    num_steps: int = 1                # > 1: the decodes run this many steps back to back on the device
    # Block copies the executor makes before the step: (device, host) to host memory, (host, device) back.
    swap_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    swap_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


PREFILL_ORDERS = ("arrival", "spf")


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: str = "fcfs", num_scheduler_steps: int = 1, program_config: ProgramConfig | None = None,
                 max_prefill_seqs: int = 16, swap_space: SwapSpace | None = None, prefill_order: str = "arrival",
                 prefill_aging: float = 15.0, host_cache: HostCache | None = None):
        """prefill_order: "arrival" admits and continues prompts in policy order; "spf" shortest remaining
        prompt first with aging (Nexus), `remaining_prompt_tokens - prefill_aging * waited_seconds`, so short
        prompts get their first token quickly and a long one's score falls until it runs: it cannot starve.
        Program-aware policies rank first, that score breaking ties."""
        if prefill_order not in PREFILL_ORDERS:
            raise ValueError(f"prefill_order must be one of {', '.join(PREFILL_ORDERS)}, got {prefill_order!r}")
        if not prefill_aging >= 0:
            raise ValueError(f"prefill_aging must be >= 0, got {prefill_aging!r}")
        self.prefill_order = prefill_order
        self.prefill_aging = prefill_aging
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_scheduler_steps = num_scheduler_steps
        self.max_prefill_seqs = max_prefill_seqs  # prefill chunks per step: the step shapes' fixed slot count
        self.swap_space = swap_space  # None: preemption by recompute only
        self.host_cache = host_cache  # None: blocks evicted from the device pool are lost
        block_manager.host = host_cache
        # Tokens served from the prefix cache at admissions (resumptions too), from the device pool and the host tier.
        self.cached_tokens = {"device": 0, "host": 0}
        self.programs = make_policy("fcfs", program_config)
        self.set_policy(policy)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0
        # Requests in a step that is still executing (disaggregated mode), counted per step that holds them: they
        # are not preempted, and if they finish meanwhile their blocks are freed only once no step holds them,
        # since a step may still write them.
        self.busy: collections.Counter[str] = collections.Counter()
        # Whether a request of a step in flight may be preempted: safe only where every step runs in dispatch
        # order on one device stream, so its freed blocks are written by later steps only (not in the
        # disaggregated mode, where another worker may take them while the step still runs).
        self.preempt_in_flight = True
        self.waiting_joins_decodes = True  # aggregated steps admit waiting prompts beside the decodes
        # Whether the executor takes the limits that the step in flight decides (StepInput.late): else a request
        # whose grammar or bad words need its last sample waits for that sample to land.
        self.late_limits = False
        self._deferred_free: set[str] = set()

    def set_policy(self, policy: str) -> None:
        """Changes the order of calls; only while no request is queued or running (benchmarks compare policies on
        one compiled engine). The process table carries over: sessions and attained service stay."""
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {policy!r}")
        if self.programs.calls:
            raise RuntimeError(f"cannot change the scheduling policy with {len(self.programs.calls)} requests in "
                               "the engine")
        # The process table runs under every policy, so sessions work whatever the order.
        table, clock = self.programs.table, self.programs.clock
        self.programs = make_policy(policy if policy in PROGRAM_POLICIES else "fcfs", self.programs.config, clock)
        self.programs.table = table
        self.policy_name = policy
        self.policy = REQUEST_ORDERS.get(policy) or (lambda r: self.programs.priority(r.request_id))
        # Program-aware policies rank cached contexts too: least attained service kept longest.
        self.block_manager.set_retention(None if policy in REQUEST_ORDERS else self.programs.retention)

    def add(self, request: Request) -> None:
        self.programs.on_arrival(Call(request.request_id, request.program_id, request.arrival_time,
                                      request.num_prompt_tokens, request.thread_id))
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request) -> None:
        """Removes a finished (or aborted) request from the queues and releases its blocks."""
        if request in self.running:
            self.running.remove(request)
            if request.request_id in self.busy or request.num_inflight:
                self._deferred_free.add(request.request_id)
            else:
                self.block_manager.free(request.request_id)
        elif request in self.waiting:
            self.waiting.remove(request)  # holds no device blocks: never admitted, or preempted
            if self.swap_space is not None:
                self.swap_space.release(request.request_id)
        self.programs.on_finish(request.request_id)

    def release(self, out: "SchedulerOutput") -> None:
        """Marks a dispatched plan's requests as no longer in flight; frees the blocks of those that finished
        while it ran."""
        for c in out.chunks:
            rid = c.request.request_id
            self.busy[rid] -= 1
            if self.busy[rid] <= 0:
                del self.busy[rid]
            self._free_if_idle(c.request)

    def _free_if_idle(self, req: Request) -> None:
        """Frees the blocks of a request that finished while steps held it, once none does."""
        rid = req.request_id
        if rid in self._deferred_free and not req.num_inflight and rid not in self.busy:
            self._deferred_free.discard(rid)
            self.block_manager.free(rid)

    def dispatched(self, out: SchedulerOutput) -> None:
        """The overlapped loop dispatched `out` and may plan the next step before it lands: its chunks' tokens are
        counted as in flight, and its samples as pending, until `landed`."""
        for c in out.chunks:
            c.request.num_inflight += self._computes(out, c)
            c.request.num_pending += c.samples * out.num_steps

    @staticmethod
    def _computes(out: SchedulerOutput, c: ScheduledChunk) -> int:
        """Tokens whose K/V the chunk's step computes: a multi-step decode computes its input and all but its
        last sample."""
        return c.num_tokens + out.num_steps - 1

    def landed(self, out: SchedulerOutput) -> None:
        """A dispatched plan is done (folded or failed): frees the blocks of its requests that finished meanwhile
        and have no other step in flight."""
        for c in out.chunks:
            req = c.request
            req.num_inflight -= self._computes(out, c)
            req.num_pending -= c.samples * out.num_steps
            self._free_if_idle(req)

    def record_service(self, out: SchedulerOutput, seconds: float) -> None:
        """Charges a step's wall time to every request in it (program-aware policies rank by attained service)."""
        for c in out.chunks:
            if c.request.is_finished:
                continue  # aborted while its step executed: its call record is gone
            self.programs.on_scheduled(c.request.request_id, seconds, out.num_steps if c.samples else 0)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        out = SchedulerOutput([], [], [])
        self.block_manager.rerank()  # service accrued and sessions ended since the last plan
        order = sorted(self.running, key=self.policy)
        planned: set[int] = set()
        # Decodes before prompt chunks, so a long prompt never delays a token that is due.
        prompts = [r for r in order if r.in_prefill]
        if self.prefill_order == "spf":
            prompts.sort(key=self.admission_key)
        for req in [r for r in order if not r.in_prefill] + prompts:
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if req.in_prefill and len(out.prefills) >= self.max_prefill_seqs:
                continue
            if req.remaining_tokens <= 0:
                continue  # the step in flight draws its last token (the overlapped loop)
            if req.num_pending and self.needs_last_token(req) and not self.late_limits:
                continue
            n = min(req.num_planned_tokens - req.num_planned_computed, budget)
            if not self._allocate_or_preempt(req, n, order, planned, out):
                continue
            planned.add(id(req))
            self._plan(out, req, n)
            budget -= n
        if not out.preempted:
            budget = self._admit(budget, out)
        out.num_steps = self._decode_steps(out)
        if self.host_cache is not None:  # after every allocation of this plan, each of which may evict
            copies_out, copies_in = self.host_cache.flush()
            out.swap_out.extend(copies_out)
            out.swap_in.extend(copies_in)
        return out

    def _decode_steps(self, out: SchedulerOutput) -> int:
        """How many decode steps the plan may run back to back: more than one only for a decode-only batch
        that nothing waiting could join (so no one's first token is delayed), no request wanting logprobs, a
        logit bias, penalties, constraints or prompt log-probs or still under min_tokens, and no request able to
        finish by length before the last step; it needs the blocks for all of them."""
        k = self.num_scheduler_steps
        if k == 1 or out.prefills or out.preempted or not out.decodes:
            return 1
        if self.waiting_joins_decodes and self.waiting and len(self.running) < self.max_num_seqs:
            return 1
        if any(c.request.params.logprobs is not None or c.request.params.logit_bias or c.request.penalty
               or c.request.params.allowed_token_ids or c.request.constraints is not None
               or c.request.prompt_logprobs is not None
               or len(c.request.output_token_ids) + c.request.num_pending < c.request.params.min_tokens
               for c in out.decodes):
            return 1  # logprobs, biases, penalties, allowed and (under min_tokens) banned ids: single steps
        k = min(k, *(c.request.remaining_tokens for c in out.decodes))
        for c in out.decodes:
            if k > 1 and self.block_manager.allocate(c.request.request_id, c.start + k) is None:
                return 1
        return max(k, 1)

    @staticmethod
    def needs_last_token(req: Request) -> bool:
        """Whether a request's next step needs its latest sample on the host (its grammar or bad words decide
        what it may sample; nexus_jax.core.constraints): it is not planned while a sample of it is in flight."""
        return req.constraints is not None and req.constraints.needs_history

    def advance(self, req: Request) -> None:
        """Records that one more token of `req` had its K/V computed inside a multi-step decode."""
        if not self.block_manager.holds(req.request_id):
            return  # preempted while the run executed: its progress was set then (see update)
        req.num_computed_tokens += 1
        self.block_manager.commit(req.request_id, req.all_token_ids, req.num_computed_tokens)

    def _allocate_or_preempt(self, req: Request, n: int, order: list[Request], planned: set[int],
                             out: SchedulerOutput) -> bool:
        while self.block_manager.allocate(req.request_id, req.num_planned_computed + n) is None:
            # A victim may be in the step in flight: the steps run in dispatch order on one device, so that step
            # writes and reads its blocks before any later step (or swap) can touch them again.
            # One whose step in flight draws its last token frees its blocks when that lands: never a victim.
            victims = [r for r in order if id(r) not in planned and r is not req and r.status is RequestStatus.RUNNING
                       and r.remaining_tokens > 0 and (self.preempt_in_flight or self._idle(r))]
            victim = victims[-1] if victims else req
            if victim is req and not (self.preempt_in_flight or self._idle(req)):
                return False  # it waits for its step in flight to land, then may give up its blocks
            self._preempt(victim, out)
            if victim is req:
                return False
        return True

    def _idle(self, req: Request) -> bool:
        return not req.num_inflight and req.request_id not in self.busy

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        copies = None
        # The K/V of tokens in flight counts: the swap-out is dispatched after the step that writes it.
        computed = -(-req.num_planned_computed // self.block_manager.block_size)
        if self.swap_space is not None and computed:
            blocks = self.block_manager.block_table(req.request_id)[:computed]
            copies = self.swap_space.swap_out(req.request_id, blocks)
        self._to_waiting(req, keep_computed=copies is not None)
        if copies is not None:
            out.swap_out.extend(copies)
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(req)

    def requeue(self, req: Request) -> None:
        """A running request back to waiting with its K/V dropped, to be recomputed: the step that ran it died
        with its worker, or the pool holding its K/V was restarted. Its generated tokens are kept."""
        self.busy.pop(req.request_id, None)
        self._to_waiting(req, keep_computed=False)

    def _to_waiting(self, req: Request, keep_computed: bool) -> None:
        # Freeing drops this sequence's references only: blocks that others share stay in place for them.
        self.block_manager.free(req.request_id)
        self.running.remove(req)
        req.status = RequestStatus.WAITING
        # A waiting request is admitted only after its step in flight landed (admission stops for a plan that
        # preempts), so num_computed_tokens alone is what a resumption starts from.
        req.num_computed_tokens = req.num_planned_computed if keep_computed else 0
        self.waiting.append(req)

    def _admit(self, budget: int, out: SchedulerOutput) -> int:
        bm = self.block_manager
        for req in sorted(self.waiting, key=self.admission_key):
            if budget == 0 or len(self.running) >= self.max_num_seqs or len(out.prefills) >= self.max_prefill_seqs:
                break
            if req.waits_for is not None:
                if not req.waits_for.is_finished and req.waits_for.num_computed_tokens < req.num_prompt_tokens:
                    continue
                req.waits_for = None
            salt = req.params.cache_salt
            prefix = bm.match_prefix(req.all_token_ids, salt)
            # A cache hit would skip prompt positions whose log-probs are still to compute.
            hits = req.prompt_logprobs is None or len(req.prompt_logprobs) >= req.num_prompt_tokens
            if not hits:
                prefix = []
            swapped = self.swap_space.num_held(req.request_id) if self.swap_space is not None else 0
            keys = bm.match_host(req.all_token_ids, prefix, salt) if hits and not swapped else []
            # Taken before allocating, whose evictions may store in the host tier and so evict from it.
            taken = self.host_cache.take(keys) if keys else []
            # A swapped-out request resumes where it was, or further if the prefix cache holds more.
            start = max((len(prefix) + len(keys)) * bm.block_size, req.num_computed_tokens if swapped else 0)
            n = min(req.num_tokens - start, budget)
            table = bm.allocate(req.request_id, start + n, prefix, salt, owner=req.program_id)
            if table is None:
                if keys:
                    self.host_cache.put_back(keys, taken)
                break  # no room: later requests wait too, so the queue order is kept
            if swapped:
                skip = min(len(prefix), swapped)  # host blocks whose tokens the prefix cache holds on the device
                out.swap_in.extend(self.swap_space.swap_in(req.request_id, table[skip:swapped], skip))
            if keys:
                self.host_cache.restore(taken, table[len(prefix):len(prefix) + len(keys)])
                bm.commit(req.request_id, req.all_token_ids, start)  # the restored blocks are matchable again
            self.cached_tokens["device"] += len(prefix) * bm.block_size
            self.cached_tokens["host"] += len(keys) * bm.block_size
            req.num_computed_tokens = start
            req.status = RequestStatus.RUNNING
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = time.monotonic()
                req.num_cached_tokens = start  # vLLM reports the first admission's
            self.waiting.remove(req)
            self.running.append(req)
            self._plan(out, req, n)
            budget -= n
        return budget

    def swapped_out(self, out: SchedulerOutput) -> list[Request]:
        """The requests that a plan preempted to the swap space (lost if its copies fail)."""
        space = self.swap_space
        return [r for r in out.preempted if space is not None and space.holds(r.request_id)]

    def cache_stats(self) -> dict[str, int]:
        """Counters of the swap space and the host tier, when configured, and the prompt tokens served from each
        cache tier."""
        return {"prefix_cache_device_hit_tokens": self.cached_tokens["device"],
                "prefix_cache_host_hit_tokens": self.cached_tokens["host"],
                **(self.swap_space.stats() if self.swap_space is not None else {}),
                **(self.host_cache.stats() if self.host_cache is not None else {})}

    def admission_key(self, req: Request) -> tuple:
        """Order of the waiting queue, and with "spf" of the prompts being computed."""
        if self.prefill_order == "arrival":
            return self.policy(req)
        waited = time.monotonic() - req.arrival_time
        score = (req.num_tokens - req.num_computed_tokens) - self.prefill_aging * waited
        # Every policy but FCFS ranks first (priority, program service); FCFS is shortest-prompt-first.
        return (*self.policy(req), score) if self.policy_name != "fcfs" else (score, req.arrival_time)

    def _plan(self, out: SchedulerOutput, req: Request, n: int) -> None:
        chunk = ScheduledChunk(req, req.num_planned_computed, n)
        (out.decodes if n == 1 else out.prefills).append(chunk)

    def update(self, out: SchedulerOutput) -> None:
        """Records that the plan ran: the chunks' K/V is now in the pool (the engine appends sampled tokens)."""
        for c in out.chunks:
            req = c.request
            if not self.block_manager.holds(req.request_id):
                continue  # preempted while the step ran: its blocks are gone or swapped, its progress set then
            # An aborted request never receives its last sample, whose K/V the step computed: commit what is known.
            req.num_computed_tokens = min(c.start + c.num_tokens, req.num_tokens)
            self.block_manager.commit(req.request_id, req.all_token_ids, req.num_computed_tokens)
