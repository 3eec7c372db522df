"""The SM ladder: the warm workers of the disaggregated engine, their names and their shares of the SMs.

Each rung is a decode SM share (percent); its decode worker runs on that share and its prefill worker on the rest
(100 - share), so the two run side by side. With a prefill share of its own (`split_prefill_share`) every rung's
prefill runs on that share instead, overlapping decode's SMs under MPS (one prefill worker for all rungs; 100: the
aggregate worker). Besides the rungs, the holder (owns the shared weights and KV pool,
runs no steps) and the aggregate worker (mixed steps, or one phase alone) run on all SMs. The partition controller
picks rungs by share, the engine dispatches to workers by name, and the pool starts each worker with the MPS
environment of its share: all three read this one mapping.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from runner.workers.mps import MpsControl

HOLDER = "holder"        # owns the shared weights and KV pool; runs no steps
AGGREGATE = "aggregate"  # all SMs: mixed steps, or one phase alone
PHASES = ("decode", "prefill")


def decode_worker(share: int) -> str:
    """The name of the decode worker of the rung with this decode share."""
    return f"decode-{share}"


def prefill_worker(decode_share: int) -> str:
    """The name of the prefill worker of the rung with this decode share (it runs on the rest)."""
    return f"prefill-{100 - decode_share}"


@dataclasses.dataclass(frozen=True)
class LadderWorker:
    name: str
    role: str          # HOLDER, AGGREGATE, "decode" or "prefill"
    sm_percent: int


class SmLadder:
    def __init__(self, decode_shares: Sequence[int], prefill_share: int | None = None):
        """prefill_share: every rung's prefill share (percent; None: 100 - the rung's decode share)."""
        if not decode_shares or any(not isinstance(s, int) or not 1 <= s <= 99 for s in decode_shares):
            raise ValueError(f"ladder must be non-empty integer decode shares within 1..99, "
                             f"got {list(decode_shares)}")
        if prefill_share is not None and (not isinstance(prefill_share, int) or not 1 <= prefill_share <= 100):
            raise ValueError(f"prefill share must be an integer percentage within 1..100, got {prefill_share!r}")
        self.shares: list[int] = sorted(set(decode_shares))
        self.prefill_share = prefill_share
        self.workers: list[LadderWorker] = [LadderWorker(HOLDER, HOLDER, 100), LadderWorker(AGGREGATE, AGGREGATE, 100)]
        for share in self.shares:
            self.workers.append(LadderWorker(decode_worker(share), "decode", share))
            p = self.prefill_share_of(share)
            if p < 100 and all(w.name != f"prefill-{p}" for w in self.workers):  # 100: the aggregate worker
                self.workers.append(LadderWorker(f"prefill-{p}", "prefill", p))
        self._by_name = {w.name: w for w in self.workers}

    def prefill_share_of(self, decode_share: int) -> int:
        """The prefill share (percent) of the rung with this decode share."""
        return self.prefill_share or 100 - decode_share

    def worker(self, phase: str, decode_share: int) -> str:
        """The name of `phase`'s worker on the rung with this decode share."""
        if phase == "decode":
            return decode_worker(decode_share)
        share = self.prefill_share_of(decode_share)
        return AGGREGATE if share == 100 else f"prefill-{share}"

    def phase_workers(self, phase: str) -> list[str]:
        """`phase`'s workers from the fewest SMs to the most."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
        return [w.name for w in sorted((w for w in self.workers if w.role == phase), key=lambda w: w.sm_percent)]

    def decode_alone(self, private: Sequence[str], aggregate: bool) -> str:
        """Where a decode that starts alone runs: on all SMs (the aggregate worker) when aggregation is allowed,
        unless that worker reads the holder's weights while a decode worker has its own copy (`private` names the
        workers with copies; 80 GB: decode-50): decode loses ~10% on half the SMs but 1.6-1.8x on shared weights
        (RESULTS.md). Else the widest decode worker, with its own copy if one has it."""
        if aggregate and (AGGREGATE in private or not private):
            return AGGREGATE
        workers = self.phase_workers("decode")
        return next((n for n in reversed(workers) if n in private), workers[-1])

    def sm_percent(self, name: str) -> int:
        return self._by_name[name].sm_percent

    def env(self, name: str, mps: MpsControl | None) -> dict[str, str]:
        """The MPS client environment of worker `name` (its SM share); none without MPS (shares not enforced)."""
        return {} if mps is None else mps.client_env(self.sm_percent(name))
