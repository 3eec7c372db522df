"""The simulator's configuration: the engine limits each replica mirrors, KV capacity, routing, and the cost model
that stands in for the GPU (`EstimatedCost`, fitted by hand to the 8B shape, or `ProfiledCost`, a profiled table of
`nexus_jax.disagg.cost_model` such as the H100 one)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from nexus_jax.disagg.cost_model import CostModel, profile_path
from nexus_jax.programs.router import RouterConfig

H100_PROFILE = profile_path("NVIDIA H100 80GB HBM3", "llama-3.1-8b")
H100_KV_TOKENS = 16791 * 16   # the 8B's KV pool on an H100 as measured (benchmarks/RESULTS.md)
# The H200's, scaled by the pool-sized buffers measured on each (71.29 and 34.46 GiB, RESULTS.md 2026-12-07).
H200_KV_TOKENS = int(H100_KV_TOKENS * 71.29 / 34.46)
KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2  # the 8B's K and V, bf16: 128 KiB
# A 4096-token context (512 MiB) came back from pinned host memory in 10.6 ms on an H100 (RESULTS.md, 2026-12-08).
H100_RESTORE_PER_TOKEN = 10.6e-3 / 4096


@dataclasses.dataclass(frozen=True)
class EstimatedCost:
    """step = overhead + prefill_per_token * prefill tokens + decode_per_seq * decodes + per_context * their
    context. Defaults: Llama-3.1-8B on one H100 (bf16): ~16 ms per decode step at batch 256 x 640 context
    (weights read ~5 ms, KV read ~6 ms, per-token compute ~5 ms) and ~200 ms per 8192-token prefill chunk."""
    step_overhead: float = 5.0e-3
    prefill_per_token: float = 2.4e-5
    decode_per_seq: float = 2.0e-5
    decode_per_context_token: float = 3.6e-8

    def step_time(self, chunks: Sequence[tuple[int, int]], decode_batch: int, decode_context: int) -> float:
        """chunks: (new tokens, tokens already cached) of each prompt chunk."""
        return (self.step_overhead + self.prefill_per_token * sum(n for n, _ in chunks)
                + self.decode_per_seq * decode_batch + self.decode_per_context_token * decode_context)


@dataclasses.dataclass(frozen=True)
class ProfiledCost:
    """A profiled latency table (`nexus-jax profile`): an aggregated step on all SMs, prompt chunks costed with
    their cached prefix (attention over it)."""
    model: CostModel

    @classmethod
    def load(cls, path: str | Path = H100_PROFILE) -> "ProfiledCost":
        return cls(CostModel.load(path))

    def step_time(self, chunks: Sequence[tuple[int, int]], decode_batch: int, decode_context: int) -> float:
        return self.model.predict_mixed(decode_batch, decode_context, chunks)


@dataclasses.dataclass(frozen=True)
class SimConfig:
    max_num_seqs: int = 256              # these four as the engine's defaults (EngineConfig)
    max_num_batched_tokens: int = 2048
    max_prefill_seqs: int = 16
    kv_capacity_tokens: int = 400_000    # per replica; ~52 GB of bf16 KV at 128 KiB per token beside the weights
    block_size: int = 16
    prefix_caching: bool = True
    preempt: bool = False
    cost: EstimatedCost | ProfiledCost = EstimatedCost()
    num_replicas: int = 1
    routing: RouterConfig = RouterConfig()
    host_capacity_tokens: int = 0        # the host tier of the prefix cache (0: off), per replica
    host_restore_per_token: float = H100_RESTORE_PER_TOKEN  # seconds of copy per restored token (overlapped
    # with the step before, as the engine's overlapped loop issues it)
    retention: bool = True               # mlfq/plas/atlas rank evictions by program, as the engine does
    sessions: bool = False               # programs end their session with their last call (EndSession)
    step_host_time: float = 0.0          # seconds of host work added to every step (the engine's, not overlapped)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_seqs", "kv_capacity_tokens",
                     "block_size", "num_replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("host_capacity_tokens", "host_restore_per_token", "step_host_time"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def host_tokens(gib: float) -> int:
    """Tokens of the 8B's K/V that `gib` GiB of host memory hold (EngineConfig.host_cache_gib)."""
    return int(gib * 2**30) // KV_BYTES_PER_TOKEN


def h100_config(**overrides) -> SimConfig:
    """Llama-3.1-8B on H100s: the profiled step times and the measured KV pool."""
    return SimConfig(**{"cost": ProfiledCost.load(), "kv_capacity_tokens": H100_KV_TOKENS, **overrides})
