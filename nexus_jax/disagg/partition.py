"""The partition controller: each step, run aggregated on all SMs (one mixed chunked-prefill step), or split the
SMs between a decode worker and a prefill worker at one rung of the ladder of warm workers, by predicted goodput.

Every candidate (the mixed step at the chunk budget, and each rung) is scored by goodput.py: the TBT of the running
decodes and the TTFT of the waiting prompts under it, against both SLOs, with the co-run contention of a split
counted; its goodput is the number of requests predicted to meet both. The best split rung is the one with the
most goodput, then the lowest risk (the worst latency over its SLO). DuetServe's rule is kept as the tie rule:
the aggregate runs unless the split beats it, i.e. unless the split has more goodput, or equal goodput while the
aggregate misses an SLO and the split misses it by less. So a mixed step that meets both SLOs always aggregates.

Hysteresis (a fraction h): the current choice is scored against the SLOs, every challenger against SLOs tightened
by (1 - h), so a load hovering at a boundary keeps its choice (no flapping), while a clear gain still moves it.

Every decision is recorded in a bounded log (time, load summary, each candidate's predicted TTFT, TBT, goodput and
risk, the choice and why), exported through `stats()` (the engine's stats, Prometheus), and logged: at INFO when
the choice changes, at DEBUG otherwise.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Sequence

from nexus_jax.disagg.goodput import Candidate, LatencyModel, LoadState, Slo, predict
from nexus_jax.disagg.ladder import SmLadder

__all__ = ["Decision", "LatencyModel", "LoadState", "MODES", "PartitionController", "Slo"]

log = logging.getLogger(__name__)

MODES = ("aggregate", "split", "decode_only", "prefill_only")


@dataclasses.dataclass(frozen=True)
class Decision:
    mode: str                 # one of MODES
    decode_share: int         # percent of the SMs (100 for aggregate and decode_only, 0 for prefill_only)
    prefill_share: int
    objective: str            # goodput | decode-only | prefill-only | idle
    predicted_decode: float   # seconds per decode step (the mixed step for aggregate)
    predicted_prefill: float  # seconds per prefill step (the mixed step for aggregate)
    reason: str
    predicted_ttft: float = 0.0   # the worst waiting prompt's
    goodput: int = 0              # requests predicted to meet both SLOs

    @property
    def label(self) -> str:
        """Short form for metrics and logs: 'aggregate', 'split d40/p60', 'decode_only', 'prefill_only'."""
        return f"split d{self.decode_share}/p{self.prefill_share}" if self.mode == "split" else self.mode


class PartitionController:
    def __init__(self, cost_model: LatencyModel, ladder: SmLadder | Sequence[int] = (20, 30, 40, 60),
                 slo: Slo = Slo(), *, hysteresis: float = 0.1, allow_aggregate: bool = True, log_size: int = 256,
                 paced_first_token: bool = False):
        """ladder: the warm workers' ladder (its prefill share, if any, is scored), or its decode SM shares
        (percent), prefill getting 100 - share.
        log_size: how many recent decisions the decision log keeps. paced_first_token: the engine sends a split's
        first token as the decode step of the second starts (its first gap is one step)."""
        self.ladder = ladder if isinstance(ladder, SmLadder) else SmLadder(ladder)
        if not 0 <= hysteresis < 1:
            raise ValueError(f"hysteresis must be within [0, 1), got {hysteresis}")
        if not isinstance(log_size, int) or log_size <= 0:
            raise ValueError(f"log_size must be a positive integer, got {log_size!r}")
        self.cost_model = cost_model
        self.slo = slo
        self.hysteresis = hysteresis
        self.allow_aggregate = allow_aggregate
        self.paced_first_token = paced_first_token
        self.current: Decision | None = None
        self.decisions = 0
        self.switches = 0
        self.evaluations = 0           # candidates scored
        self.mode_counts: collections.Counter[str] = collections.Counter()
        self.log: collections.deque[dict[str, object]] = collections.deque(maxlen=log_size)

    def decide(self, state: LoadState) -> Decision:
        decision, candidates = self._decide(state)
        changed = self.current is None or decision.label != self.current.label
        self.decisions += 1
        if changed and self.current is not None:
            self.switches += 1
        self.mode_counts[decision.mode] += 1
        self.current = decision
        self.log.append({"time": time.time(), "load": state.summary(),
                         "candidates": [c.as_dict(self.slo) for c in candidates], "choice": decision.label,
                         "tbt": decision.predicted_decode, "ttft": decision.predicted_ttft,
                         "goodput": decision.goodput, "changed": changed, "reason": decision.reason})
        log.log(logging.INFO if changed else logging.DEBUG,
                "partition: mode=%s decode=%d prefill=%d t_decode=%.2fms t_prefill=%.2fms ttft=%.3fs goodput=%d/%d "
                "batch=%d sum_kv=%d prefill_tokens=%d waiting=%d kv=%.2f changed=%s reason=%s", decision.mode,
                decision.decode_share, decision.prefill_share, decision.predicted_decode * 1e3,
                decision.predicted_prefill * 1e3, decision.predicted_ttft, decision.goodput, state.num_requests,
                state.decode_batch, state.decode_sum_kv, sum(n for n, _ in state.prefill_chunks),
                len(state.waiting), state.kv_usage, changed, decision.reason)
        return decision

    def stats(self) -> dict[str, object]:
        return {"decisions": self.decisions, "switches": self.switches, "evaluations": self.evaluations,
                "modes": dict(self.mode_counts), "current": self.current.label if self.current else None,
                "slo": {"ttft": self.slo.ttft, "tbt": self.slo.tbt}, "hysteresis": self.hysteresis,
                "last": self.log[-1] if self.log else None, "log": list(self.log)}

    def _decide(self, state: LoadState) -> tuple[Decision, list[Candidate]]:
        m, chunks = self.cost_model, state.prefill_chunks
        if state.decode_batch == 0:
            t = m.predict_prefill(100, chunks) if chunks else 0.0
            return Decision("prefill_only", 0, 100, "prefill-only" if chunks else "idle", 0.0, t,
                            "no decodes" if chunks else "nothing to run"), []
        if not chunks:
            t = m.predict_decode(100, state.decode_batch, state.decode_sum_kv)
            return Decision("decode_only", 100, 0, "decode-only", t, 0.0, "no prefill",
                            goodput=int(t <= self.slo.tbt) * state.decode_batch), []
        splits = [self._predict(state, d) for d in self.ladder.shares]
        agg = self._predict(state, None) if self.allow_aggregate else None
        held = next((c for c in (agg, *splits) if c is not None and self._held(c)), None)
        # Hysteresis: while a candidate holds, every other one is judged against SLOs tightened by h.
        tight = self.slo if held is None else self.slo.scaled(1 - self.hysteresis)

        def key(c: Candidate) -> tuple[int, float]:
            slo = self.slo if c is held else tight
            return c.goodput(slo), -c.risk(slo)

        best = max(splits, key=key)  # ties: the first, i.e. the fewest decode SMs
        note = f"most goodput of {len(splits)} rungs"
        if held is not None and held.mode == "split" and best is not held and key(best) <= key(held):
            best, note = held, f"kept d{held.decode_share}: no rung beats it by the hysteresis"
        candidates = [c for c in (agg, *splits) if c is not None]
        if agg is not None:
            if not _beats(key(best), key(agg), state.num_requests):
                return self._decision(agg, "the split does not beat the mixed step"), candidates
            note += f"; beats the mixed step (goodput {agg.goodput(self.slo)}, risk {agg.risk(self.slo):.2f})"
        return self._decision(best, note), candidates

    def _held(self, c: Candidate) -> bool:
        return self.current is not None and (self.current.mode, self.current.decode_share) == (c.mode, c.decode_share)

    def _predict(self, state: LoadState, decode_share: int | None) -> Candidate:
        self.evaluations += 1
        prefill_share = None if decode_share is None else self.ladder.prefill_share_of(decode_share)
        return predict(self.cost_model, state, decode_share, self.paced_first_token, prefill_share)

    def _decision(self, c: Candidate, note: str) -> Decision:
        goodput, risk = c.goodput(self.slo), c.risk(self.slo)
        reason = (f"{c.label}: goodput {goodput}, t_decode {c.tbt * 1e3:.1f}ms, ttft {c.ttft:.3f}s, "
                  f"risk {risk:.2f}; {note}")
        return Decision(c.mode, c.decode_share, c.prefill_share, "goodput", c.tbt, c.t_prefill, reason, c.ttft,
                        goodput)


def _beats(split: tuple[int, float], agg: tuple[int, float], num_requests: int) -> bool:
    """Whether the split beats the mixed step, given each one's (goodput, -risk): more goodput, or equal goodput
    while the mixed step misses an SLO and the split misses it by less. Ties go to the aggregate."""
    if split[0] != agg[0]:
        return split[0] > agg[0]
    return agg[0] < num_requests and split[1] > agg[1]
