"""A discrete-event simulation of N aggregated engine replicas behind a router, with a cost model for the GPU.

Each replica mirrors `Scheduler`: a step has a token budget, a cap on running sequences and on prompt chunks;
running calls go first in policy order (decodes, then prompt chunks), then, unless the step preempted someone,
waiting calls are admitted in policy order while budget, slots and KV last. KV exhaustion preempts the
lowest-priority running call by recompute. With `preempt=True` a waiting call that outranks the lowest running
call also takes its slot when all slots are taken. Each replica has its own policy (process table), as each
engine of `ReplicatedAsyncLLM` has; calls are routed on arrival by `nexus_jax.programs.router.Router`.

Prefix caching, per replica: a program's calls read one growing context (`CallSpec.prefix` says how much of a
prompt repeats it). A replica keeps, per program, the longest run of that context it has computed, in full
blocks, as long as KV room lasts (`sim_cache`: least recently used first out, or by program rank under the
program-aware policies' retention; never while a running call reads it), then in a host tier if one is configured,
from which a later call restores it at a copy cost per token. A call admitted there prefills only what is not
cached; a preempted call leaves its computed blocks cached, as the engine does. A prompt cut to fit the context
starts a new context, which misses. Outputs of parallel calls all count as cached context (only the chosen
branch's really is), which flatters routing policies that scatter a program.

The step time comes from a cost model: `EstimatedCost` (fitted by hand to the 8B shape) or `ProfiledCost` (a
profiled table of `nexus_jax.disagg.cost_model`, e.g. the H100 one), plus the configured host time per step and
the copies of the contexts the step restores from the host tier.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools

from nexus_jax.benchmark.sim_cache import ReplicaKv
from nexus_jax.benchmark.sim_config import SimConfig
from nexus_jax.benchmark.workloads import CallSpec, ProgramSpec, generate
from nexus_jax.programs.policies import REQUEST_ORDERS, ProgramPolicy, make_policy
from nexus_jax.programs.router import Router
from nexus_jax.programs.table import Call, ProgramConfig


@dataclasses.dataclass
class SimResult:
    policy: str
    program_latency: dict[str, float]       # program id -> last completion - arrival (seconds)
    program_tokens: dict[str, int]          # program id -> tokens generated
    num_steps: int
    num_preemptions: int
    makespan: float
    prefill_tokens: int = 0                 # prompt tokens computed (recomputes included)
    cached_tokens: int = 0                  # prompt tokens served by the prefix cache (either tier)
    host_hit_tokens: int = 0                # of which restored from the host tier

    @property
    def mean_program_latency(self) -> float:
        return sum(self.program_latency.values()) / len(self.program_latency)

    @property
    def mean_token_latency(self) -> float:
        """Autellix's metric: mean over programs of (program response time / tokens it generated)."""
        return sum(lat / self.program_tokens[p] for p, lat in self.program_latency.items()) / len(
            self.program_latency)


@dataclasses.dataclass(eq=False)
class _Program:
    spec: ProgramSpec
    stage: int = 0
    left: int = 0          # calls of the current stage not finished
    tokens: int = 0
    context: int = 0       # bumped when a prompt was cut: what replicas cached before is another context


@dataclasses.dataclass(eq=False)
class _Call:
    call_id: str
    spec: CallSpec
    program: _Program
    context: int
    match: int             # leading tokens shared with the program's context (grows with what it computed)
    computed: int = 0      # tokens whose K/V exists
    hit: int = 0           # of which read from the prefix cache
    generated: int = 0
    running: bool = False

    @property
    def num_tokens(self) -> int:
        return self.spec.prompt_tokens + self.generated


class _Replica:
    def __init__(self, policy: ProgramPolicy, config: SimConfig):
        self.policy = policy
        self.waiting: list[_Call] = []
        self.running: list[_Call] = []
        # The engine ranks evictions by program under the program-aware policies (Scheduler.set_policy).
        rank = policy.retention if config.retention and policy.name not in REQUEST_ORDERS else None
        self.kv = ReplicaKv(config.kv_capacity_tokens, config.host_capacity_tokens, config.block_size, rank)
        self.restoring = 0     # tokens the step being planned copies in from the host tier
        self.last_end, self.last_dt = -1.0, 0.0  # the previous step's end and duration
        self.busy = False      # a step is executing or about to be planned


_END, _ARRIVAL, _PLAN = range(3)  # at equal times: fold a step, then route arrivals, then plan the next step


class Simulator:
    def __init__(self, policy: str, config: SimConfig | None = None, program_config: ProgramConfig | None = None):
        self.config = cfg = config or SimConfig()
        self.now = 0.0
        clock = lambda: self.now  # noqa: E731
        self.replicas = [_Replica(make_policy(policy, program_config, clock), cfg) for _ in range(cfg.num_replicas)]
        self.router = Router(cfg.num_replicas, cfg.routing, clock)
        self.events: list[tuple[float, int, int, object]] = []
        self._seq = itertools.count()
        self.num_preemptions = self.prefill_tokens = self.cached_tokens = self.host_hit_tokens = self.num_steps = 0
        self.latency: dict[str, float] = {}
        self.tokens: dict[str, int] = {}

    def run(self, programs: list[ProgramSpec]) -> SimResult:
        cap = self.config.kv_capacity_tokens
        for p in programs:
            if any(c.prompt_tokens + c.output_tokens > cap for s in p.stages for c in s.calls):
                raise ValueError(f"program {p.program_id} has a call longer than the KV capacity ({cap} tokens)")
            self._start_stage(_Program(p), p.arrival)
        while self.events:
            self.now, kind, _, item = heapq.heappop(self.events)
            if kind == _ARRIVAL:
                self._arrive(item)
            elif kind == _PLAN:
                self._plan_step(item)
            else:
                self._end_step(*item)
        return SimResult(self.replicas[0].policy.name, self.latency, self.tokens, self.num_steps,
                         self.num_preemptions, self.now, self.prefill_tokens, self.cached_tokens,
                         self.host_hit_tokens)

    def _push(self, at: float, kind: int, item: object) -> None:
        heapq.heappush(self.events, (at, kind, next(self._seq), item))

    def _start_stage(self, prog: _Program, at: float) -> None:
        calls = prog.spec.stages[prog.stage].calls
        if prog.stage > 0 and any(c.prefix == 0 for c in calls):
            prog.context += 1
        prog.left = len(calls)
        for i, spec in enumerate(calls):
            call = _Call(f"{prog.spec.program_id}/{prog.stage}.{i}", spec, prog, prog.context, spec.prefix)
            self._push(at, _ARRIVAL, call)

    def _arrive(self, call: _Call) -> None:
        index = self.router.route(call.call_id, call.program.spec.program_id, call.spec.prompt_tokens)
        rep = self.replicas[index]
        table, pid = rep.policy.table, call.program.spec.program_id
        if self.config.sessions and pid not in table.programs:
            table.start(pid, self.now)
        rep.policy.on_arrival(Call(call.call_id, call.program.spec.program_id, self.now, call.spec.prompt_tokens,
                                   call.spec.thread_id))
        rep.waiting.append(call)
        self._wake(rep)

    def _wake(self, rep: _Replica) -> None:
        if not rep.busy and (rep.waiting or rep.running):
            rep.busy = True
            self._push(self.now, _PLAN, rep)

    # ---- one step of one replica

    def _plan_step(self, rep: _Replica) -> None:
        plan = self._schedule(rep)
        if not plan:
            raise RuntimeError("a replica with work planned an empty step")  # a bug, not a load condition
        chunks = [(n, c.computed) for c, n in plan if n > 1]
        decodes = [c for c, n in plan if n == 1]
        cfg = self.config
        # The overlapped loop plans (and starts the copies of) a step while the one before runs: a restore delays
        # its step only by what the previous step did not cover, all of it after an idle replica.
        covered = rep.last_dt if self.now == rep.last_end else 0.0
        dt = (cfg.cost.step_time(chunks, len(decodes), sum(c.computed + 1 for c in decodes)) + cfg.step_host_time
              + max(cfg.host_restore_per_token * rep.restoring - covered, 0.0))
        rep.restoring = 0
        self.prefill_tokens += sum(n for n, _ in chunks)
        self.num_steps += 1
        self._push(self.now + dt, _END, (rep, plan, dt))

    def _end_step(self, rep: _Replica, plan: list[tuple[_Call, int]], dt: float) -> None:
        routed = len(self.replicas) > 1  # with one replica the router's load decides nothing
        for call, n in plan:
            call.computed += n
            rep.kv.own += n
            sampled = call.computed == call.num_tokens
            if sampled:
                call.generated += 1
                call.program.tokens += 1
                if routed:
                    self.router.progress(call.call_id, call.generated)
            rep.policy.on_scheduled(call.call_id, dt, int(sampled))
            if call.generated == call.spec.output_tokens:
                self._finish(rep, call)
        rep.last_end, rep.last_dt = self.now, dt
        rep.busy = False
        self._wake(rep)

    def _finish(self, rep: _Replica, call: _Call) -> None:
        self._release(rep, call)
        rep.policy.on_finish(call.call_id)
        self.router.finish(call.call_id)
        prog = call.program
        prog.left -= 1
        if prog.left:
            return
        prog.stage += 1
        if prog.stage < len(prog.spec.stages):
            self._start_stage(prog, self.now + prog.spec.stages[prog.stage].delay)
        else:
            self.latency[prog.spec.program_id] = self.now - prog.spec.arrival
            self.tokens[prog.spec.program_id] = prog.tokens
            self.router.end_program(prog.spec.program_id)
            for rep in self.replicas if self.config.sessions else ():
                if prog.spec.program_id in rep.policy.table.programs:
                    rep.policy.table.end(prog.spec.program_id)

    def _schedule(self, rep: _Replica) -> list[tuple[_Call, int]]:
        cfg = self.config
        key = lambda c: rep.policy.priority(c.call_id)  # noqa: E731
        rep.running.sort(key=key)
        rep.waiting.sort(key=key)
        if cfg.preempt:  # a better waiting call takes the slot of the worst running one
            for call in list(rep.waiting):
                if len(rep.running) < cfg.max_num_seqs or not key(call) < key(rep.running[-1]):
                    break
                self._preempt(rep, rep.running[-1])
            rep.waiting.sort(key=key)
        preempted = False  # for KV: then, as in the engine, nobody is admitted this step
        budget, plan, prefills = cfg.max_num_batched_tokens, [], 0
        planned_tokens = 0  # K/V this step will add
        decoding = [c.num_tokens - c.computed == 1 for c in rep.running]
        order = [c for c, d in zip(rep.running, decoding) if d] + [c for c, d in zip(rep.running, decoding) if not d]
        planned: set[int] = set()
        for call in order:
            if budget == 0:
                break
            if not call.running or (call.num_tokens - call.computed > 1 and prefills >= cfg.max_prefill_seqs):
                continue  # preempted for KV earlier in this loop, or no prompt slot left
            n = min(call.num_tokens - call.computed, budget)
            while not rep.kv.room(planned_tokens + n, None):
                victims = [c for c in rep.running if id(c) not in planned and c is not call]
                victim = victims[-1] if victims else call
                self._preempt(rep, victim)
                preempted = True
                if victim is call:
                    break
            if not call.running:
                continue
            planned.add(id(call))
            plan.append((call, n))
            prefills += n > 1
            planned_tokens += n
            budget -= n
        for call in [] if preempted else list(rep.waiting):
            if budget == 0 or len(rep.running) >= cfg.max_num_seqs or prefills >= cfg.max_prefill_seqs:
                break
            pid = call.program.spec.program_id
            on_device, on_host = rep.kv.lookup(pid, call.context, min(call.match, call.num_tokens - 1))
            cached = on_device + on_host
            n = min(call.num_tokens - cached, budget)
            if not rep.kv.room(planned_tokens + n + on_host, pid if cached else None):
                break  # later calls wait too, so the queue order is kept
            if on_host:
                rep.kv.restore(pid, on_host)
                rep.restoring += on_host
                self.host_hit_tokens += on_host
            if cached:
                rep.kv.read(pid)
            call.computed = call.hit = cached
            call.running = True
            self.cached_tokens += cached
            rep.waiting.remove(call)
            rep.running.append(call)
            plan.append((call, n))
            prefills += n > 1
            planned_tokens += n
            budget -= n
        return plan

    # ---- KV and the prefix cache

    def _release(self, rep: _Replica, call: _Call) -> None:
        """The call leaves the running set: its computed full blocks stay cached as its program's context."""
        rep.running.remove(call)
        call.running = False
        rep.kv.own -= call.computed - call.hit
        if self.config.prefix_caching:
            tokens = call.computed // self.config.block_size * self.config.block_size
            rep.kv.release(call.program.spec.program_id, call.context, tokens, read=call.hit > 0)

    def _preempt(self, rep: _Replica, call: _Call) -> None:
        self._release(rep, call)
        call.match = max(call.match, call.computed)
        call.computed = call.hit = 0
        rep.waiting.append(call)
        self.num_preemptions += 1


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
