"""Goodput prediction: for one candidate partition (the aggregated mixed step, or one rung of the split), how many
of the current requests would meet both SLOs.

- TBT of the running decodes: the decode step time under the candidate, i.e. the mixed step for the aggregate (its
  decodes wait for the chunk budget's prefill), or the decode worker's step at its share with the co-run
  contention of the prefill beside it (HBM bandwidth is not partitioned: up to +36% on decode, DESIGN.md §8).
- TTFT of each waiting prompt, in prefill order: the time it has waited plus the queue ahead of it and its own
  tokens drained at the candidate's prefill rate (the next prefill step's tokens over that step's time).

A request counts when it meets both: a running decode when the step meets TBT; a waiting prompt when its TTFT
meets the TTFT SLO and both the candidate's step and its first gap meet TBT (it will decode at that pace, after a
handoff to the decode worker under a split: `handoff_gap`, one step when the first token is paced). Pure functions
over a latency model, so the controller (partition.py) and its tests can call them with hand-computable fakes.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

from runner.workers.handoff import HANDOFF_LEAD


class LatencyModel(Protocol):
    def predict_decode(self, share: float, batch: int, sum_kv: int, corun: bool = False) -> float: ...
    def predict_prefill(self, share: float, chunks: Sequence[tuple[int, int]], corun: bool = False) -> float: ...
    def predict_mixed(self, decode_batch: int, sum_kv: int, chunks: Sequence[tuple[int, int]]) -> float: ...


# Decode on weights mapped over CUDA IPC (a worker without its own copy) against XLA's own memory, where
# `nexus-jax profile` measures: 1.59x on an H100 (12.9 vs 8.1 ms), 1.79x / 1.65x on an H200 alone / beside a
# prefill (12.19 vs 6.82, 15.04 vs 9.12 ms); the dynamic split on shared weights ran TPOT 25-30 ms where the profile
# predicted a decode under 30 ms (RESULTS.md, 2026-12-07).
SHARED_WEIGHT_DECODE = 1.7


@dataclasses.dataclass(frozen=True)
class SharedWeightDecode:
    """`model` with its decode predictions at the SM shares in `shares` (workers that read the holder's weights)
    scaled by `factor`. Mixed steps are left as predicted: their prefill GEMMs are compute-bound."""
    model: LatencyModel
    shares: frozenset[int]
    factor: float = SHARED_WEIGHT_DECODE

    def predict_decode(self, share: float, batch: int, sum_kv: int, corun: bool = False) -> float:
        t = self.model.predict_decode(share, batch, sum_kv, corun)
        return t * self.factor if round(share) in self.shares else t

    def predict_prefill(self, share: float, chunks: Sequence[tuple[int, int]], corun: bool = False) -> float:
        return self.model.predict_prefill(share, chunks, corun)

    def predict_mixed(self, decode_batch: int, sum_kv: int, chunks: Sequence[tuple[int, int]]) -> float:
        return self.model.predict_mixed(decode_batch, sum_kv, chunks)


@dataclasses.dataclass(frozen=True)
class Slo:
    ttft: float = 2.0   # seconds
    tbt: float = 0.05   # seconds between tokens of one sequence

    def __post_init__(self) -> None:
        if not (self.ttft > 0 and self.tbt > 0):
            raise ValueError(f"SLO targets must be positive seconds, got ttft={self.ttft} tbt={self.tbt}")

    def scaled(self, factor: float) -> "Slo":
        return Slo(self.ttft * factor, self.tbt * factor)


@dataclasses.dataclass
class LoadState:
    decode_batch: int
    decode_sum_kv: int
    prefill_chunks: list[tuple[int, int]]   # the next prefill step's (new_tokens, prefix_len)
    kv_usage: float                         # 0..1
    # Prompts still before their first token, in prefill order: (prompt tokens left, seconds waited so far).
    # None: just the next step's chunks, waited 0 s.
    waiting: list[tuple[int, float]] | None = None
    # The chunks a mixed step would run, within the aggregate's own budget. None: the prefill step's.
    aggregate_chunks: list[tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        if self.decode_batch < 0 or self.decode_sum_kv < 0 or not 0 <= self.kv_usage <= 1:
            raise ValueError(f"bad load state: batch {self.decode_batch}, sum_kv {self.decode_sum_kv}, "
                             f"kv_usage {self.kv_usage} (need >= 0, >= 0, within [0, 1])")
        if self.waiting is None:
            self.waiting = [(n, 0.0) for n, _ in self.prefill_chunks]
        if self.aggregate_chunks is None:
            self.aggregate_chunks = list(self.prefill_chunks)
        if any(n < 0 or waited < 0 for n, waited in self.waiting):
            raise ValueError(f"waiting prompts need tokens >= 0 and seconds waited >= 0, got {self.waiting}")

    @property
    def num_requests(self) -> int:
        return self.decode_batch + len(self.waiting)

    def summary(self) -> dict[str, float]:
        return {"decode_batch": self.decode_batch, "sum_kv": self.decode_sum_kv,
                "prefill_tokens": sum(n for n, _ in self.prefill_chunks), "waiting": len(self.waiting),
                "waiting_tokens": sum(n for n, _ in self.waiting),
                "max_waited_s": max((w for _, w in self.waiting), default=0.0), "kv_usage": self.kv_usage}


@dataclasses.dataclass(frozen=True)
class Candidate:
    mode: str                  # "aggregate" or "split"
    decode_share: int          # percent of the SMs; 100 for the aggregate
    decode_batch: int          # running decodes
    tbt: float                 # predicted seconds per decode step
    t_prefill: float           # predicted seconds per prefill step
    ttfts: tuple[float, ...]   # predicted TTFT of each waiting prompt
    # A waiting prompt's gap between its first and second token: one mixed step when aggregated; under a split
    # the handoff's, up to 2 + lead decode steps (runner.workers.handoff), which alone failed the H200 split, or
    # one decode step when the first token goes out as that step starts (nexus_jax.disagg.pacing).
    first_gap: float = 0.0
    prefill_share: int = 100   # percent of the SMs (a split's: 100 - decode_share unless the ladder sets it)

    @property
    def label(self) -> str:
        return f"split d{self.decode_share}/p{self.prefill_share}" if self.mode == "split" else self.mode

    @property
    def ttft(self) -> float:
        """The worst waiting prompt's predicted TTFT (0 when none waits)."""
        return max(self.ttfts, default=0.0)

    def goodput(self, slo: Slo) -> int:
        """Requests predicted to meet both SLOs (a waiting prompt's TBT counts its first gap too)."""
        waiting = sum(t <= slo.ttft for t in self.ttfts) if self.first_gap <= slo.tbt else 0
        return (self.tbt <= slo.tbt) * (self.decode_batch + waiting)

    def risk(self, slo: Slo) -> float:
        """The worst of tbt / SLO (first gap included while prompts wait) and ttft / SLO: <= 1 when every request
        meets both."""
        gap = max(self.tbt, self.first_gap if self.ttfts else 0.0)
        return max(gap / slo.tbt, self.ttft / slo.ttft)

    def as_dict(self, slo: Slo) -> dict[str, object]:
        return {"candidate": self.label, "tbt": self.tbt, "ttft": self.ttft, "t_prefill": self.t_prefill,
                "goodput": self.goodput(slo), "risk": self.risk(slo)}


def predict(model: LatencyModel, state: LoadState, decode_share: int | None, paced: bool = False,
            prefill_share: int | None = None) -> Candidate:
    """The candidate's step times and TTFTs; decode_share None is the aggregated mixed step; paced: a split's first
    tokens are paced; prefill_share: a split's (default 100 - decode_share; shares that overlap are scored with the
    profile's contention of the split, which measured shares that do not). Both phases must have work (the
    controller handles a phase alone without candidates)."""
    chunks = state.prefill_chunks
    if decode_share is None:
        chunks = state.aggregate_chunks
        t_decode = t_prefill = model.predict_mixed(state.decode_batch, state.decode_sum_kv, chunks)
        prefill_share = 100
    else:
        prefill_share = prefill_share or 100 - decode_share
        t_decode = model.predict_decode(decode_share, state.decode_batch, state.decode_sum_kv, corun=True)
        t_prefill = model.predict_prefill(prefill_share, chunks, corun=True)
    return Candidate("aggregate" if decode_share is None else "split", 100 if decode_share is None else decode_share,
                     state.decode_batch, t_decode, t_prefill,
                     tuple(queue_ttfts(state.waiting, sum(n for n, _ in chunks), t_prefill)),
                     t_decode if decode_share is None else handoff_gap(t_decode, paced), prefill_share)


def within_budget(chunks: Sequence[tuple[int, int]], tokens: int) -> list[tuple[int, int]]:
    """The leading (new_tokens, prefix_len) chunks that fit `tokens`, the last one cut: a step planned at that
    budget takes the same prompts in the same order."""
    out = []
    for n, prefix in chunks:
        if tokens <= 0:
            break
        out.append((min(n, tokens), prefix))
        tokens -= out[-1][0]
    return out


def handoff_gap(t_decode: float, paced: bool = False) -> float:
    """The longest first gap of a prompt that joins a split's decode worker. Sent at once, it lands just after the
    queued step was planned, so it waits for the rest of the running step, the queued one and its own
    (HandoffTimer); paced, the first token goes out as its own step starts: one step."""
    return t_decode if paced else (2 + HANDOFF_LEAD) * t_decode


def queue_ttfts(waiting: Sequence[tuple[int, float]], step_tokens: int, step_seconds: float) -> list[float]:
    """Each waiting prompt's predicted TTFT: its wait so far plus the tokens ahead of it and its own, drained at
    step_tokens per step_seconds."""
    if step_tokens <= 0:
        return [float("inf") for _ in waiting]
    per_token = step_seconds / step_tokens
    ttfts, queued = [], 0
    for tokens, waited in waiting:
        queued += tokens
        ttfts.append(waited + queued * per_token)
    return ttfts
