"""The one validated engine configuration."""

from __future__ import annotations

import dataclasses

from nexus_jax.programs.policies import SCHEDULING_POLICIES
from runner.model.config import DTYPE_NAMES

KERNEL_IMPLS = (None, "pallas", "interpret", "xla")
DISAGGREGATION_MODES = ("off", "auto", "on")
PREEMPTION_MODES = ("recompute", "swap")


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
    max_programs: int = 100_000            # process-table records; past it the longest-idle sessionless ones go
    seed: int = 0                          # draws the seeds of requests that bring none
    kernel_impl: str | None = None         # attention kernels: None = auto
    params_cache_dir: str | None = None    # orbax cache of converted weights: later starts skip safetensors
    max_prefill_seqs: int = 16             # prefill chunks per step (a fixed slot count of the step shapes)
    warmup: bool = False                   # compile every step shape at start instead of on first use
    min_table_blocks: int = 64             # narrowest block-table width compiled (fewer widths, fewer programs)
    compilation_cache_dir: str | None = None  # JAX's persistent compilation cache (shared by worker processes)
    # Index into jax.devices() that holds the weights and KV pool and runs the steps (None: JAX's default device).
    # Aggregated mode only; ReplicatedAsyncLLM.from_config(..., devices=[...]) gives one engine per GPU this way.
    device: int | None = None
    # Intra-GPU prefill/decode disaggregation. "off": one process, chunked prefill. "auto": prefill and decode
    # workers on SM partitions under a private CUDA MPS daemon, or (one warning) "off" where MPS cannot start.
    # "on": the worker processes even without MPS (CPU, tests): the same path, SM shares not enforced.
    disaggregation: str = "off"
    sm_ladder: tuple[int, ...] = (30, 50)  # decode SM shares (%) of the warm workers; prefill gets the rest
    aggregate_when_safe: bool = True       # DuetServe: one mixed step on all SMs while it meets the TBT SLO
    slo_ttft: float = 2.0                  # seconds: time to first token the partition controller aims for
    slo_tbt: float = 0.05                  # seconds: time between tokens
    prefill_aging: float = 15.0            # prefill order: remaining prompt tokens - this * seconds waited
    cost_model_path: str | None = None     # profiled latency table (nexus-jax profile); default: found by GPU
    # How a running request gives up its KV blocks: "recompute" frees them; "swap" copies them to host memory
    # (aggregated mode only) and recomputes only when swap_space_gib is full.
    preemption_mode: str = "recompute"
    swap_space_gib: float = 4.0            # host memory for swapped-out KV blocks

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "cpu_kv_cache_tokens",
                     "num_scheduler_steps", "max_prefill_seqs", "min_table_blocks", "max_programs"):
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
        if self.disaggregation not in DISAGGREGATION_MODES:
            raise ValueError(f"disaggregation must be one of {', '.join(DISAGGREGATION_MODES)}, "
                             f"got {self.disaggregation!r}")
        ladder = tuple(self.sm_ladder)
        if not ladder or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 99 for s in ladder):
            raise ValueError(f"sm_ladder must be decode SM percentages in 1..99, got {self.sm_ladder!r}")
        object.__setattr__(self, "sm_ladder", tuple(sorted(set(ladder))))
        for name in ("slo_ttft", "slo_tbt"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive seconds, got {getattr(self, name)!r}")
        if not self.prefill_aging >= 0:
            raise ValueError(f"prefill_aging must be >= 0, got {self.prefill_aging!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, "
                             f"got {self.preemption_mode!r}")
        gib = self.swap_space_gib
        if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not 0 < gib < float("inf"):
            raise ValueError(f"swap_space_gib must be a positive number of GiB, got {gib!r}")
        if self.device is not None and (not isinstance(self.device, int) or isinstance(self.device, bool)
                                        or self.device < 0):
            raise ValueError(f"device must be a non-negative index into jax.devices() or None, got {self.device!r}")
        if self.device is not None and self.disaggregation != "off":
            raise ValueError(f"device is for the aggregated mode (disaggregation='off'), got disaggregation="
                             f"{self.disaggregation!r}: the disaggregated workers are processes of their own, so "
                             f"run one server per GPU")
        if self.preemption_mode == "swap" and self.disaggregation != "off":
            raise ValueError("swap preemption is for the aggregated mode: use preemption_mode='recompute' with "
                             f"disaggregation={self.disaggregation!r}")
