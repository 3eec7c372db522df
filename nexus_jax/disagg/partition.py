"""The partition controller: each step, run aggregated on all SMs, or split the SMs between a decode worker and a
prefill worker, and at which rung of the ladder of warm workers. Pure host logic over a cost model.

DuetServe's rule first: one mixed step on all SMs while its predicted latency meets the TBT SLO. Otherwise
Nexus's objective picks the split: while KV use <= kv_threshold, prefill-priority (fastest prefill whose decode
time stays within decode_slack of decode's best and within TBT); above it, decode-priority (fastest decode whose
prefill time stays within prefill_slack of prefill's best; TBT may override the slack). Predicted times include
the co-run contention, since in a split both phases run at once.

The search is Nexus's greedy walk: decode time falls and prefill time rises with the decode share, so the best
rung is the boundary where the constraint starts (or stops) holding. It starts at the current rung and steps
one rung at a time, so a steady load costs 2-4 cost-model evaluations per decision (counted in `evaluations`).

Hysteresis (a fraction h): a split keeps its rung while that rung still meets its constraint within (1 + h) and
TBT, unless the new optimum improves the objective by more than h; a split returns to the aggregate only when
the mixed step is under (1 - h) TBT, and decode-priority returns to prefill-priority only under (1 - h) of the
KV threshold.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Callable, Protocol, Sequence

from nexus_jax.disagg.ladder import SmLadder

log = logging.getLogger(__name__)

MODES = ("aggregate", "split", "decode_only", "prefill_only")


class LatencyModel(Protocol):
    def predict_decode(self, share: float, batch: int, sum_kv: int, corun: bool = False) -> float: ...
    def predict_prefill(self, share: float, chunks: Sequence[tuple[int, int]], corun: bool = False) -> float: ...
    def predict_mixed(self, decode_batch: int, sum_kv: int, chunks: Sequence[tuple[int, int]]) -> float: ...


@dataclasses.dataclass(frozen=True)
class Slo:
    ttft: float = 2.0   # seconds
    tbt: float = 0.05   # seconds between tokens of one sequence

    def __post_init__(self) -> None:
        if not (self.ttft > 0 and self.tbt > 0):
            raise ValueError(f"SLO targets must be positive seconds, got ttft={self.ttft} tbt={self.tbt}")


@dataclasses.dataclass(frozen=True)
class Decision:
    mode: str                 # one of MODES
    decode_share: int         # percent of the SMs (100 for aggregate and decode_only, 0 for prefill_only)
    prefill_share: int
    objective: str            # prefill-priority | decode-priority | aggregate-safe | decode-only | prefill-only | idle
    predicted_decode: float   # seconds per decode step (the mixed step for aggregate)
    predicted_prefill: float  # seconds per prefill step (the mixed step for aggregate)
    reason: str

    @property
    def label(self) -> str:
        """Short form for metrics and logs: 'aggregate', 'split d40/p60', 'decode_only', 'prefill_only'."""
        return f"split d{self.decode_share}/p{self.prefill_share}" if self.mode == "split" else self.mode


@dataclasses.dataclass
class LoadState:
    decode_batch: int
    decode_sum_kv: int
    prefill_chunks: list[tuple[int, int]]   # the next prefill step's (new_tokens, prefix_len)
    kv_usage: float                         # 0..1

    def __post_init__(self) -> None:
        if self.decode_batch < 0 or self.decode_sum_kv < 0 or not 0 <= self.kv_usage <= 1:
            raise ValueError(f"bad load state: batch {self.decode_batch}, sum_kv {self.decode_sum_kv}, "
                             f"kv_usage {self.kv_usage} (need >= 0, >= 0, within [0, 1])")


class PartitionController:
    def __init__(self, cost_model: LatencyModel, ladder: SmLadder | Sequence[int] = (20, 30, 40, 60),
                 slo: Slo = Slo(), *, kv_threshold: float = 0.7, decode_slack: float = 1.1, prefill_slack: float = 1.3,
                 hysteresis: float = 0.1, allow_aggregate: bool = True):
        """ladder: the warm workers' ladder, or its decode SM shares (percent); prefill gets 100 - share."""
        self.ladder = ladder if isinstance(ladder, SmLadder) else SmLadder(ladder)
        if not 0 <= kv_threshold <= 1:
            raise ValueError(f"kv_threshold must be within [0, 1], got {kv_threshold}")
        if decode_slack < 1 or prefill_slack < 1:
            raise ValueError(f"slacks must be >= 1, got decode {decode_slack} and prefill {prefill_slack}")
        if not 0 <= hysteresis < 1:
            raise ValueError(f"hysteresis must be within [0, 1), got {hysteresis}")
        self.cost_model = cost_model
        self.slo = slo
        self.kv_threshold, self.decode_slack, self.prefill_slack = kv_threshold, decode_slack, prefill_slack
        self.hysteresis = hysteresis
        self.allow_aggregate = allow_aggregate
        self.current: Decision | None = None
        self.decisions = 0
        self.switches = 0
        self.evaluations = 0           # cost-model evaluations of split candidates
        self.mode_counts: collections.Counter[str] = collections.Counter()

    def decide(self, state: LoadState) -> Decision:
        decision = self._decide(state)
        changed = self.current is None or decision.label != self.current.label
        self.decisions += 1
        if changed and self.current is not None:
            self.switches += 1
        self.mode_counts[decision.mode] += 1
        self.current = decision
        log.log(logging.INFO if changed else logging.DEBUG,
                "partition: mode=%s decode=%d prefill=%d objective=%s t_decode=%.2fms t_prefill=%.2fms "
                "batch=%d sum_kv=%d prefill_tokens=%d kv=%.2f changed=%s reason=%s", decision.mode,
                decision.decode_share, decision.prefill_share, decision.objective, decision.predicted_decode * 1e3,
                decision.predicted_prefill * 1e3, state.decode_batch, state.decode_sum_kv,
                sum(n for n, _ in state.prefill_chunks), state.kv_usage, changed, decision.reason)
        return decision

    def stats(self) -> dict[str, object]:
        return {"decisions": self.decisions, "switches": self.switches, "evaluations": self.evaluations,
                "modes": dict(self.mode_counts), "current": self.current.label if self.current else None}

    def _decide(self, state: LoadState) -> Decision:
        m, chunks = self.cost_model, state.prefill_chunks
        if state.decode_batch == 0:
            t = m.predict_prefill(100, chunks) if chunks else 0.0
            return Decision("prefill_only", 0, 100, "prefill-only" if chunks else "idle", 0.0, t,
                            "no decodes" if chunks else "nothing to run")
        if not chunks:
            t = m.predict_decode(100, state.decode_batch, state.decode_sum_kv)
            return Decision("decode_only", 100, 0, "decode-only", t, 0.0, "no prefill")
        if self.allow_aggregate:
            t = m.predict_mixed(state.decode_batch, state.decode_sum_kv, chunks)
            # Leaving a split for the aggregate needs a margin, so a mixed time hovering at TBT does not flap.
            limit = self.slo.tbt * (1 - self.hysteresis if self._current_mode() == "split" else 1)
            if t <= limit:
                return Decision("aggregate", 100, 100, "aggregate-safe", t, t,
                                f"mixed step {t * 1e3:.1f}ms <= TBT {self.slo.tbt * 1e3:.0f}ms")
        return self._split(state)

    def _current_mode(self) -> str | None:
        return self.current.mode if self.current else None

    def _split(self, state: LoadState) -> Decision:
        cache_d: dict[int, float] = {}
        cache_p: dict[int, float] = {}

        def t_dec(d: int) -> float:
            if d not in cache_d:
                self.evaluations += 1
                cache_d[d] = self.cost_model.predict_decode(d, state.decode_batch, state.decode_sum_kv, corun=True)
            return cache_d[d]

        def t_pre(d: int) -> float:
            if d not in cache_p:
                self.evaluations += 1
                cache_p[d] = self.cost_model.predict_prefill(100 - d, state.prefill_chunks, corun=True)
            return cache_p[d]

        lad, tbt = self.ladder.shares, self.slo.tbt
        cur = self.current.decode_share if self.current and self.current.mode == "split" else None
        start = lad.index(cur) if cur in lad else len(lad) - 1
        note = ""
        # Back from decode-priority only once KV use is clearly below the threshold, so it does not flap there.
        was_decode_priority = cur is not None and self.current.objective == "decode-priority"
        # Prefill-priority's rung: the fastest prefill whose decode time stays within slack of decode's best (its
        # largest rung) and within TBT.
        best = t_dec(lad[-1])
        decode_bound = min(self.decode_slack * best, tbt)
        if best > tbt:
            pp_choice, pp_note = lad[-1], "no ladder share meets TBT; fastest decode"
        else:
            pp_choice, pp_note = _boundary(lad, start, lambda d: t_dec(d) <= decode_bound, lowest=True), ""
        if state.kv_usage <= self.kv_threshold * (1 - self.hysteresis if was_decode_priority else 1):
            objective, cost, con, bound = "prefill-priority", t_pre, t_dec, decode_bound
            choice, note = pp_choice, pp_note
        else:
            # Minimise decode time; prefill within slack of its best (the smallest decode rung). TBT comes first:
            # if the choice misses it, take the smallest larger rung that meets it.
            objective, cost, con = "decode-priority", t_dec, t_pre
            bound = self.prefill_slack * t_pre(lad[0])
            choice = _boundary(lad, start, lambda d: t_pre(d) <= bound, lowest=False)
            if t_dec(choice) > tbt:
                meets = next((d for d in lad if d > choice and t_dec(d) <= tbt), None)
                choice = meets if meets is not None else lad[-1]
                note = ("TBT overrides prefill slack" if meets is not None
                        else "no ladder share meets TBT; fastest decode")
            if choice < pp_choice:
                # Decode time is nearly flat in the share while prefill time is linear, so the prefill slack can
                # stop below the rung prefill-priority would give decode; under KV pressure decode gets no less.
                choice, note = pp_choice, f"raised to prefill-priority's d{pp_choice}"
        if cur is not None and cur != choice and self.current.objective == objective:
            # Keep the current rung while it still (nearly) satisfies the constraint, never trading away TBT,
            # unless the optimum is better by more than the hysteresis.
            near = con(cur) <= max(bound, con(choice)) * (1 + self.hysteresis)
            slo_ok = t_dec(cur) <= tbt or t_dec(choice) > tbt
            gain = (cost(cur) - cost(choice)) / cost(cur) if cost(cur) > 0 else 0.0
            if near and slo_ok and gain <= self.hysteresis:
                choice, note = cur, f"kept d{cur}: optimum gains only {gain:.0%}"
        reason = f"{objective}: d{choice} t_decode {t_dec(choice) * 1e3:.1f}ms t_prefill {t_pre(choice) * 1e3:.1f}ms"
        return Decision("split", choice, 100 - choice, objective, t_dec(choice), t_pre(choice),
                        reason + (f"; {note}" if note else ""))


def _boundary(ladder: list[int], start: int, ok: Callable[[int], bool], lowest: bool) -> int:
    """The lowest (or highest) rung where `ok` holds, assuming ok is monotone (holds on the high rungs for
    lowest=True, on the low rungs for lowest=False); walked from `start` one rung at a time. If ok holds
    nowhere, the rung nearest to where it would hold."""
    step = -1 if lowest else 1          # direction toward a better objective
    i = start
    if ok(ladder[i]):
        while 0 <= i + step < len(ladder) and ok(ladder[i + step]):
            i += step
        return ladder[i]
    while 0 <= i - step < len(ladder):
        i -= step
        if ok(ladder[i]):
            return ladder[i]
    return ladder[i]
