"""A discrete-event simulation of the aggregated engine with a cost model instead of the GPU.

It mirrors `Scheduler`: each step has a token budget and a cap on running sequences; running calls go first in
policy order (decodes, then prompt chunks), then waiting calls are admitted in policy order while budget, slots
and KV last; KV exhaustion preempts the lowest-priority running call by recompute. With `preempt=True` a waiting
call that outranks the lowest running call also takes its slot when all slots are taken (priority preemption).
A step lasts `CostModel.step_time`; the policy sees the simulated clock and the engine's events. Prefix caching
is not modelled, so every call (and every recompute) prefills its whole prompt.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools

from nexus_jax.programs import Call, ProgramConfig, make_policy
from nexus_jax.workloads import CallSpec, ProgramSpec, generate


@dataclasses.dataclass(frozen=True)
class CostModel:
    """step = overhead + prefill_per_token * prefill tokens + decode_per_seq * decodes + per_context * their
    context. Defaults: Llama-3.1-8B on one H100 (bf16): ~16 ms per decode step at batch 256 x 640 context
    (weights read ~5 ms, KV read ~6 ms, per-token compute ~5 ms) and ~200 ms per 8192-token prefill chunk."""
    step_overhead: float = 5.0e-3
    prefill_per_token: float = 2.4e-5
    decode_per_seq: float = 2.0e-5
    decode_per_context_token: float = 3.6e-8

    def step_time(self, prefill_tokens: int, decode_batch: int, decode_context: int) -> float:
        return (self.step_overhead + self.prefill_per_token * prefill_tokens + self.decode_per_seq * decode_batch
                + self.decode_per_context_token * decode_context)


@dataclasses.dataclass(frozen=True)
class SimConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    kv_capacity_tokens: int = 400_000   # ~52 GB of bf16 KV at 128 KiB per token left beside 16 GB of weights
    preempt: bool = False
    cost: CostModel = CostModel()


@dataclasses.dataclass
class SimResult:
    policy: str
    program_latency: dict[str, float]       # program id -> last completion - arrival (seconds)
    program_tokens: dict[str, int]          # program id -> tokens generated
    num_steps: int
    num_preemptions: int
    makespan: float

    @property
    def mean_program_latency(self) -> float:
        return sum(self.program_latency.values()) / len(self.program_latency)

    @property
    def mean_token_latency(self) -> float:
        """Autellix's metric: mean over programs of (program response time / tokens it generated)."""
        return sum(lat / self.program_tokens[p] for p, lat in self.program_latency.items()) / len(
            self.program_latency)


@dataclasses.dataclass(eq=False)
class _Call:
    call_id: str
    spec: CallSpec
    program: "_Program"
    computed: int = 0      # tokens whose K/V exists
    generated: int = 0

    @property
    def num_tokens(self) -> int:
        return self.spec.prompt_tokens + self.generated


@dataclasses.dataclass(eq=False)
class _Program:
    spec: ProgramSpec
    stage: int = 0
    left: int = 0          # calls of the current stage not finished
    tokens: int = 0


class Simulator:
    def __init__(self, policy: str, config: SimConfig | None = None, program_config: ProgramConfig | None = None):
        self.config = config or SimConfig()
        self.now = 0.0
        self.policy = make_policy(policy, program_config, clock=lambda: self.now)
        self.waiting: list[_Call] = []
        self.running: list[_Call] = []
        self.arrivals: list[tuple[float, int, _Call]] = []
        self._seq = itertools.count()
        self.num_preemptions = 0

    def run(self, programs: list[ProgramSpec]) -> SimResult:
        cap = self.config.kv_capacity_tokens
        for p in programs:
            if any(c.prompt_tokens + c.output_tokens > cap for s in p.stages for c in s.calls):
                raise ValueError(f"program {p.program_id} has a call longer than the KV capacity ({cap} tokens)")
            self._start_stage(_Program(p), p.arrival)
        latency: dict[str, float] = {}
        tokens: dict[str, int] = {}
        steps = 0
        while self.arrivals or self.waiting or self.running:
            while self.arrivals and self.arrivals[0][0] <= self.now:
                t, _, call = heapq.heappop(self.arrivals)
                self.policy.on_arrival(Call(call.call_id, call.program.spec.program_id, t,
                                            call.spec.prompt_tokens, call.spec.thread_id))
                self.waiting.append(call)
            if not self.waiting and not self.running:
                self.now = self.arrivals[0][0]
                continue
            plan = self._schedule()
            steps += 1
            for done in self._execute(plan):
                prog = done.program
                prog.left -= 1
                if prog.left == 0:
                    prog.stage += 1
                    if prog.stage < len(prog.spec.stages):
                        self._start_stage(prog, self.now + prog.spec.stages[prog.stage].delay)
                    else:
                        latency[prog.spec.program_id] = self.now - prog.spec.arrival
                        tokens[prog.spec.program_id] = prog.tokens
        return SimResult(self.policy.name, latency, tokens, steps, self.num_preemptions, self.now)

    def _start_stage(self, prog: _Program, at: float) -> None:
        calls = prog.spec.stages[prog.stage].calls
        prog.left = len(calls)
        for i, spec in enumerate(calls):
            call = _Call(f"{prog.spec.program_id}/{prog.stage}.{i}", spec, prog)
            heapq.heappush(self.arrivals, (at, next(self._seq), call))

    def _key(self, call: _Call) -> tuple:
        return self.policy.priority(call.call_id)

    def _schedule(self) -> list[tuple[_Call, int]]:
        cfg = self.config
        self.running.sort(key=self._key)
        self.waiting.sort(key=self._key)
        if cfg.preempt:  # a better waiting call takes the slot of the worst running one
            for call in list(self.waiting):
                if len(self.running) < cfg.max_num_seqs or not self._key(call) < self._key(self.running[-1]):
                    break
                self._preempt(self.running[-1])
            self.waiting.sort(key=self._key)
        budget, plan = cfg.max_num_batched_tokens, []
        used = sum(c.computed for c in self.running)
        order = [c for c in self.running if c.num_tokens - c.computed == 1]
        order += [c for c in self.running if c.num_tokens - c.computed > 1]
        planned: set[int] = set()
        for call in order:
            if budget == 0:
                break
            if call not in self.running:
                continue  # preempted for KV earlier in this loop
            n = min(call.num_tokens - call.computed, budget)
            while used + n > cfg.kv_capacity_tokens:
                victims = [c for c in self.running if id(c) not in planned and c is not call]
                victim = victims[-1] if victims else call
                used -= victim.computed
                self._preempt(victim)
                if victim is call:
                    break
            if call not in self.running:
                continue
            planned.add(id(call))
            plan.append((call, n))
            used += n
            budget -= n
        for call in list(self.waiting):
            if budget == 0 or len(self.running) >= cfg.max_num_seqs:
                break
            n = min(call.num_tokens, budget)
            if used + n > cfg.kv_capacity_tokens:
                break  # later calls wait too, so the queue order is kept
            self.waiting.remove(call)
            self.running.append(call)
            plan.append((call, n))
            used += n
            budget -= n
        return plan

    def _preempt(self, call: _Call) -> None:
        self.running.remove(call)
        call.computed = 0
        self.waiting.append(call)
        self.num_preemptions += 1

    def _execute(self, plan: list[tuple[_Call, int]]) -> list[_Call]:
        prefill = sum(n for c, n in plan if n > 1)
        decodes = [c for c, n in plan if n == 1]
        dt = self.config.cost.step_time(prefill, len(decodes), sum(c.computed + 1 for c in decodes))
        self.now += dt
        finished = []
        for call, n in plan:
            call.computed += n
            sampled = call.computed == call.num_tokens
            if sampled:
                call.generated += 1
                call.program.tokens += 1
            self.policy.on_scheduled(call.call_id, dt, int(sampled))
            if call.generated == call.spec.output_tokens:
                self.running.remove(call)
                self.policy.on_finish(call.call_id)
                finished.append(call)
        return finished


def simulate(programs: list[ProgramSpec], policy: str, config: SimConfig | None = None,
             program_config: ProgramConfig | None = None) -> SimResult:
    return Simulator(policy, config, program_config).run(programs)


def sustainable_rate(kind: str, policy: str, target_token_latency: float, rates: list[float], *,
                     num_programs: int = 200, seed: int = 0, config: SimConfig | None = None,
                     program_config: ProgramConfig | None = None) -> float:
    """The highest of `rates` (programs/s, tried in ascending order until one fails) whose mean program-level
    token latency stays within the target; 0.0 when even the lowest fails. Same seed at every rate."""
    best = 0.0
    for rate in sorted(rates):
        res = simulate(generate(kind, num_programs, rate, seed), policy, config, program_config)
        if res.mean_token_latency > target_token_latency:
            break
        best = rate
    return best
