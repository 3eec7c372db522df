"""Latency models for tests of the disaggregated engine that must drive the partition controller into a split."""

from __future__ import annotations

import math
from typing import Any, Sequence

from nexus_jax.disagg.partition import LatencyModel, PartitionController


class MixedNeverFits:
    """`model` with a mixed step that never ends: no SLO is met aggregated, so whenever both phases have work the
    split (any finite latency) beats the mixed step, even under an SLO that nothing meets."""

    def __init__(self, model: LatencyModel):
        self.inner = model

    def predict_decode(self, share: float, batch: int, sum_kv: int, corun: bool = False) -> float:
        return self.inner.predict_decode(share, batch, sum_kv, corun)

    def predict_prefill(self, share: float, chunks: Sequence[tuple[int, int]], corun: bool = False) -> float:
        return self.inner.predict_prefill(share, chunks, corun)

    def predict_mixed(self, decode_batch: int, sum_kv: int, chunks: Sequence[tuple[int, int]]) -> float:
        return math.inf

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def force_split(controller: PartitionController, on: bool = True) -> None:
    """Makes `controller` split whenever both phases have work (on), or gives it back its own model (off)."""
    base = getattr(controller.cost_model, "inner", controller.cost_model)
    controller.cost_model = MixedNeverFits(base) if on else base
