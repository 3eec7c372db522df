"""The SM ladder: the warm workers of the disaggregated engine, their names and their shares of the SMs.

Each rung is a decode SM share (percent); its decode worker runs on that share and its prefill worker on the rest
(100 - share), so the two run side by side. Besides the rungs, the holder (owns the shared weights and KV pool,
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
    def __init__(self, decode_shares: Sequence[int]):
        if not decode_shares or any(not isinstance(s, int) or not 1 <= s <= 99 for s in decode_shares):
            raise ValueError(f"ladder must be non-empty integer decode shares within 1..99, "
                             f"got {list(decode_shares)}")
        self.shares: list[int] = sorted(set(decode_shares))
        self.workers: list[LadderWorker] = [LadderWorker(HOLDER, HOLDER, 100), LadderWorker(AGGREGATE, AGGREGATE, 100)]
        for share in self.shares:
            self.workers.append(LadderWorker(decode_worker(share), "decode", share))
            self.workers.append(LadderWorker(prefill_worker(share), "prefill", 100 - share))
        self._by_name = {w.name: w for w in self.workers}

    def worker(self, phase: str, decode_share: int) -> str:
        """The name of `phase`'s worker on the rung with this decode share."""
        return decode_worker(decode_share) if phase == "decode" else prefill_worker(decode_share)

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
