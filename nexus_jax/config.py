"""The one validated engine configuration."""

from __future__ import annotations

import dataclasses

from nexus_jax.scheduler import SCHEDULING_POLICIES
from runner.config import DTYPE_NAMES

KERNEL_IMPLS = (None, "pallas", "interpret", "xla")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str | None = None               # checkpoint directory, preset name, or None for the embedded model
    dtype: str = "auto"                    # bfloat16 on a GPU, float32 on CPU
    max_model_len: int | None = None       # default: the model's max_position_embeddings, capped by the KV pool
    block_size: int = 16
    num_kv_blocks: int | None = None       # default: what gpu_memory_utilization leaves after the weights
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_tokens: int = 65536       # KV pool size where the device reports no memory limit (CPU)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048     # per-step token budget of chunked prefill
    num_scheduler_steps: int = 1           # > 1: decode-only batches run this many steps per host round trip
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"        # fcfs, priority, or program-aware: mlfq, plas, atlas
    program_beta: float = 8.0              # anti-starvation threshold of the program-aware policies
    program_idle_timeout: float = 600.0    # seconds after which an idle program's record is dropped
    seed: int = 0                          # draws the seeds of requests that bring none
    kernel_impl: str | None = None         # attention kernels: None = auto
    params_cache_dir: str | None = None    # orbax cache of converted weights: later starts skip safetensors

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "cpu_kv_cache_tokens",
                     "num_scheduler_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_model_len", "num_kv_blocks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                             f"got {self.scheduling_policy!r}")
        if self.kernel_impl not in KERNEL_IMPLS:
            raise ValueError(f"kernel_impl must be one of {KERNEL_IMPLS}, got {self.kernel_impl!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
