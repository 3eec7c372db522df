"""The one validated engine configuration.

One flat frozen dataclass, its fields grouped into sections. Each field's metadata holds a one-line `help`, its
`section` and, where the values are a fixed set, its `choices`: nexus_jax.entrypoints.engine_args turns them into
the command-line flags of every command that builds an engine.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nexus_jax.programs.policies import SCHEDULING_POLICIES
from runner.model.config import DTYPE_NAMES

KERNEL_IMPLS = (None, "pallas", "interpret", "xla")
DISAGGREGATION_MODES = ("off", "auto", "on")
PREEMPTION_MODES = ("recompute", "swap")
PREFILL_ORDER_CHOICES = ("auto", "arrival", "spf")
DECODE_LOOPS = ("engine", "worker")
DECODE_WEIGHTS = ("auto", "shared", "private")

MODEL_AND_CACHE = "model and cache"
SCHEDULING = "scheduling"
DISAGGREGATION = "disaggregation"
PROGRAMS = "programs"
SECTIONS = (MODEL_AND_CACHE, SCHEDULING, DISAGGREGATION, PROGRAMS)


def _option(default: Any, section: str, help: str, choices: tuple | None = None) -> Any:
    """A field with its default and the metadata the command line reads."""
    metadata = {"help": help, "section": section, **({"choices": choices} if choices is not None else {})}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    # --- model and cache -------------------------------------------------------------------------------------
    model: str | None = _option(
        None, MODEL_AND_CACHE, "checkpoint directory or preset name (default: the embedded tiny model)")
    dtype: str = _option("auto", MODEL_AND_CACHE, "weights and KV dtype; auto: bfloat16 on a GPU, float32 on CPU",
                         choices=DTYPE_NAMES)
    max_model_len: int | None = _option(
        None, MODEL_AND_CACHE, "longest sequence (default: the model's max_position_embeddings, capped by the KV pool)")
    block_size: int = _option(16, MODEL_AND_CACHE, "tokens per KV block")
    num_kv_blocks: int | None = _option(
        None, MODEL_AND_CACHE, "KV pool size in blocks (default: what gpu_memory_utilization leaves after the weights)")
    gpu_memory_utilization: float = _option(0.9, MODEL_AND_CACHE, "fraction of device memory for weights and KV pool")
    cpu_kv_cache_tokens: int = _option(
        65536, MODEL_AND_CACHE, "KV pool size in tokens where the device reports no memory limit (CPU)")
    enable_prefix_caching: bool = _option(True, MODEL_AND_CACHE, "reuse the KV blocks of shared prompt prefixes")
    params_cache_dir: str | None = _option(
        None, MODEL_AND_CACHE, "orbax cache of converted weights: later starts skip safetensors")
    # Index into jax.devices() that holds the weights and KV pool and runs the steps (None: JAX's default device).
    # Aggregated mode only; ReplicatedAsyncLLM.from_config(..., devices=[...]) gives one engine per GPU this way.
    device: int | None = _option(
        None, MODEL_AND_CACHE, "index into jax.devices() running the engine, aggregated mode only "
                               "(default: JAX's default device)")
    kernel_impl: str | None = _option(None, MODEL_AND_CACHE, "attention kernels (default: chosen by the device)",
                                      choices=KERNEL_IMPLS)
    compilation_cache_dir: str | None = _option(
        None, MODEL_AND_CACHE, "JAX's persistent compilation cache (shared by worker processes); on GPUs its "
        "nexus-programs/ also keeps the step programs as executables (at most 16 GiB), so a restart skips tracing")
    warmup: bool = _option(False, MODEL_AND_CACHE, "compile every step shape at start instead of on first use")
    min_table_blocks: int = _option(
        64, MODEL_AND_CACHE, "narrowest block-table width compiled (fewer widths, fewer programs)")

    # --- scheduling --------------------------------------------------------------------------------------------
    max_num_seqs: int = _option(256, SCHEDULING, "most running requests per step")
    max_num_batched_tokens: int = _option(2048, SCHEDULING, "per-step token budget of chunked prefill")
    num_scheduler_steps: int = _option(
        1, SCHEDULING, "> 1: decode-only batches run this many steps per host round trip")
    max_prefill_seqs: int = _option(
        16, SCHEDULING, "prefill chunks per step (a fixed slot count of the step shapes)")
    async_scheduling: bool = _option(
        True, SCHEDULING, "plan and dispatch step n+1 while step n runs, its sampled tokens fed on the device "
                           "(aggregated mode, single-step plans); off: the synchronous loop")
    # Nexus's shortest-prompt-first with aging is a queueing gain of its own: as a switch in both modes, so that
    # an ablation (order x SM split) measures it apart from the split.
    prefill_order: str = _option(
        "auto", SCHEDULING, "order of prompts: arrival (policy order), spf (shortest remaining prompt first, aged by "
                            "prefill_aging), auto (spf in the disaggregated mode, arrival otherwise)",
        choices=PREFILL_ORDER_CHOICES)
    scheduling_policy: str = _option("fcfs", SCHEDULING, "fcfs, priority, or program-aware: mlfq, plas, atlas",
                                     choices=SCHEDULING_POLICIES)
    # How a running request gives up its KV blocks: "recompute" frees them; "swap" copies them to host memory
    # (aggregated mode only) and recomputes only when swap_space_gib is full.
    preemption_mode: str = _option(
        "recompute", SCHEDULING, "how a preempted request gives up its KV: recompute later, or swap to host "
                                 "memory (aggregated mode only)", choices=PREEMPTION_MODES)
    swap_space_gib: float = _option(4.0, SCHEDULING, "host memory (GiB) for swapped-out KV blocks")
    # Agents re-send their context on every call: cached blocks evicted from the device pool are kept in host
    # memory and copied back on a hit instead of recomputed (aggregated mode only).
    host_cache_gib: float = _option(0.0, SCHEDULING, "host memory (GiB) for prefix-cache blocks evicted from the "
                                                     "device pool (0: off)")
    seed: int = _option(0, SCHEDULING, "draws the seeds of requests that bring none (and the embedded model's weights)")

    # --- disaggregation -----------------------------------------------------------------------------------------
    # Intra-GPU prefill/decode disaggregation. "off": one process, chunked prefill. "auto": prefill and decode
    # workers on SM partitions under a private CUDA MPS daemon, or (one warning) "off" where MPS cannot start.
    # "on": the worker processes even without MPS (CPU, tests): the same path, SM shares not enforced.
    disaggregation: str = _option(
        "off", DISAGGREGATION, "prefill/decode workers on SM partitions: off, auto (MPS, else off with a "
                               "warning), on (workers even without MPS)", choices=DISAGGREGATION_MODES)
    sm_ladder: tuple[int, ...] = _option(
        (30, 50), DISAGGREGATION, "decode SM shares (%) of the warm workers; prefill gets the rest")
    aggregate_when_safe: bool = _option(
        True, DISAGGREGATION, "one mixed step on all SMs unless a split is predicted to serve more requests "
                              "within both SLOs (DuetServe)")
    # The dynamic split planned its mixed steps at the split's prefill budget (2048 tokens), so the controller
    # judged the aggregate by a ~50 ms mixed step against a 30 ms TBT and chose it 3 times in 1654 (RESULTS.md,
    # 2026-12-07), where chunked prefill tuned to 512 met TBT: the aggregate is now planned at its own budget.
    aggregate_budget: int | None = _option(
        None, DISAGGREGATION, "token budget of the disaggregated mode's mixed step, decodes included (chunked "
                              "prefill's tuned max_num_batched_tokens; default max_num_batched_tokens)")
    slo_ttft: float = _option(
        2.0, DISAGGREGATION, "seconds: time to first token; the partition controller counts waiting prompts within it")
    slo_tbt: float = _option(
        0.05, DISAGGREGATION, "seconds: time between tokens; the partition controller counts decodes within it")
    # 15 tokens/s (the old default) let a 7K-token prompt starve for 10-14 s behind a stream of short ones on the
    # tight workload (RESULTS.md, 2026-12-07): by default a prompt is overtaken by later arrivals for at most
    # slo_ttft seconds, whatever its length.
    prefill_aging: float | None = _option(
        None, SCHEDULING, "prefill_order spf: remaining prompt tokens - this * seconds waited (tokens/s; "
                          "default max_model_len / slo_ttft)")
    # "worker": the decode worker keeps its batch and runs steps back to back, the engine only admitting and
    # releasing rows (nexus_jax.disagg.worker_loop); "engine" until measured on a GPU.
    decode_loop: str = _option(
        "engine", DISAGGREGATION, "who runs decode steps in the disaggregated mode: the engine plans each one, or "
                                  "the decode worker loops on its own (fixed split on the widest sm_ladder rung)",
        choices=DECODE_LOOPS)
    # The split's first gap (first token from the prefill worker, second from the decode worker) was its only TBT
    # miss on the tight workload (RESULTS.md, 2026-12-07): up to a decode step of waiting for the step it joins,
    # then that step. Sent when the step it joins starts, the first token costs TTFT under a step, the gap one step.
    pace_first_token: bool = _option(
        True, DISAGGREGATION, "streams of the disaggregated mode get their first token when their first decode "
                              "step starts, so the gap to the second is one decode step")
    # Weights read over CUDA IPC from the holder's arena made 8B decode 1.6x slower on an H100 (RESULTS.md,
    # 2026-12-06: 12.9 ms shared, 8.1 ms on a copy): the decode-bound workers can hold a copy of their own.
    # "auto" by default: on copies the split's decode ran 1.79x faster (H200, 12.19 -> 6.82 ms), and two copies ran
    # at utilization 0.9 (RESULTS.md); the earlier "out of memory" was the in-process fallback, not the copies.
    decode_weights: str = _option(
        "auto", DISAGGREGATION, "weights of the disaggregated mode's decode-bound workers (aggregate, decode): "
                                "shared (the holder's), private (a copy each, taken from the KV pool), auto "
                                "(private while the KV pool keeps at least half its size)", choices=DECODE_WEIGHTS)
    # Prefill on all SMs beside a 50% decode worker (by accident, 2026-12-08) gave 2.3-3.5x lower TTFT than the
    # tuned aggregated engine and its highest throughput, at 69-71 ms decode gaps with 2048-token chunks: a prefill
    # share that overlaps decode's (MPS caps each worker, it does not fence them), with a smaller
    # max_num_batched_tokens, is the experiment between that and the split (RESULTS.md).
    split_prefill_share: int | None = _option(
        None, DISAGGREGATION, "SM share (%) of a split's prefill on every rung (default: 100 - the rung's decode "
                              "share; 100: the aggregate worker, beside the decode worker)")
    cost_model_path: str | None = _option(
        None, DISAGGREGATION, "profiled latency table of `nexus-jax profile` (default: found by GPU name)")

    # --- programs ----------------------------------------------------------------------------------------------
    program_beta: float = _option(8.0, PROGRAMS, "anti-starvation threshold of the program-aware policies")
    program_idle_timeout: float = _option(
        600.0, PROGRAMS, "seconds after which an idle program's record (and a server session never ended) is dropped")
    max_programs: int = _option(
        100_000, PROGRAMS, "process-table records; past it the longest-idle sessionless ones go")
    program_retention_window: float = _option(
        5.0, PROGRAMS, "seconds an idle program's cached context keeps its program-aware rank (mlfq/plas/atlas); "
                       "after it the context is evicted first, as an ended session's")

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "cpu_kv_cache_tokens",
                     "num_scheduler_steps", "max_prefill_seqs", "min_table_blocks", "max_programs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_model_len", "num_kv_blocks", "aggregate_budget"):
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
        if self.aggregate_budget is not None and self.aggregate_budget > self.max_num_batched_tokens:
            raise ValueError(f"aggregate_budget {self.aggregate_budget} exceeds max_num_batched_tokens "
                             f"{self.max_num_batched_tokens}, the largest step the workers compile")
        for name in ("slo_ttft", "slo_tbt"):  # the partition controller divides by them and counts requests within
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be positive finite seconds, got {value!r}")
        window = self.program_retention_window
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not window >= 0:
            raise ValueError(f"program_retention_window must be >= 0 seconds, got {self.program_retention_window!r}")
        if self.prefill_aging is not None and not self.prefill_aging >= 0:
            raise ValueError(f"prefill_aging must be >= 0, got {self.prefill_aging!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.prefill_order not in PREFILL_ORDER_CHOICES:
            raise ValueError(f"prefill_order must be one of {', '.join(PREFILL_ORDER_CHOICES)}, "
                             f"got {self.prefill_order!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, "
                             f"got {self.preemption_mode!r}")
        gib = self.swap_space_gib
        if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not 0 < gib < float("inf"):
            raise ValueError(f"swap_space_gib must be a positive number of GiB, got {gib!r}")
        gib = self.host_cache_gib
        if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not 0 <= gib < float("inf"):
            raise ValueError(f"host_cache_gib must be a non-negative number of GiB (0: off), got {gib!r}")
        if gib and self.disaggregation != "off":
            raise ValueError(f"the host cache tier is for the aggregated mode: set host_cache_gib=0 with "
                             f"disaggregation={self.disaggregation!r}")
        if self.device is not None and (not isinstance(self.device, int) or isinstance(self.device, bool)
                                        or self.device < 0):
            raise ValueError(f"device must be a non-negative index into jax.devices() or None, got {self.device!r}")
        if self.device is not None and self.disaggregation != "off":
            raise ValueError(f"device is for the aggregated mode (disaggregation='off'), got disaggregation="
                             f"{self.disaggregation!r}: the disaggregated workers are processes of their own, so "
                             f"run one server per GPU")
        self._check_decode_loop()
        if self.preemption_mode == "swap" and self.disaggregation != "off":
            raise ValueError("swap preemption is for the aggregated mode: use preemption_mode='recompute' with "
                             f"disaggregation={self.disaggregation!r}")

    def spf_aging(self, max_model_len: int) -> float:
        """Tokens of credit per second waited under shortest-prompt-first: `prefill_aging`, or by default the rate
        at which the longest prompt catches up with a fresh empty one within `slo_ttft`."""
        return self.prefill_aging if self.prefill_aging is not None else max_model_len / self.slo_ttft

    def _check_decode_loop(self) -> None:
        if self.decode_weights not in DECODE_WEIGHTS:
            raise ValueError(f"decode_weights must be one of {', '.join(DECODE_WEIGHTS)}, "
                             f"got {self.decode_weights!r}")
        share = self.split_prefill_share
        if share is not None and (isinstance(share, bool) or not isinstance(share, int) or not 1 <= share <= 100):
            raise ValueError(f"split_prefill_share must be an integer percentage within 1..100 or None, got {share!r}")
        if self.decode_loop not in DECODE_LOOPS:
            raise ValueError(f"decode_loop must be one of {', '.join(DECODE_LOOPS)}, got {self.decode_loop!r}")
        if self.decode_loop == "engine":
            return
        why = ("it needs disaggregation 'on' or 'auto'" if self.disaggregation == "off" else
               "it needs async_scheduling (its steps feed on the device)" if not self.async_scheduling else
               "it needs aggregate_when_safe=False (a mixed step would take the decode batch back from the "
               "worker)" if self.aggregate_when_safe else
               "num_scheduler_steps > 1 does not apply (the loop itself runs steps back to back)"
               if self.num_scheduler_steps > 1 else None)
        if why is not None:
            raise ValueError(f"decode_loop='worker': {why}")
