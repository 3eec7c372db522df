"""Builds the disaggregated engine: MPS, the ladder of warm workers, the cost model and the controller.

`build_engine` returns None when the configuration asks for "auto" and MPS cannot be used, after one warning:
the caller then builds the aggregated engine. The engine process itself never initialises the GPU (a JAX client
there would grab device memory and could not be an MPS client of the right share); workers do all device work.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from nexus_jax.core.config import EngineConfig
from nexus_jax.core.tokenizer import eos_token_ids, load_tokenizer
from nexus_jax.disagg.cost_model import CostModel, profile_path
from nexus_jax.disagg.engine import AGGREGATE, HOLDER, DisaggEngine, decode_worker, prefill_worker
from nexus_jax.disagg.partition import PartitionController, Slo
from runner.step_batch import StepShapes
from runner.workers.pool import WorkerError, WorkerPool
from runner.workers.worker import WorkerSpec

log = logging.getLogger(__name__)

# Used to rank splits when no profile of this GPU and model exists (H100 SXM datasheet bf16 and HBM3 figures).
_DEFAULT_PEAK_FLOPS = 989e12
_DEFAULT_HBM_BW = 3.35e12


# Device memory each step-running worker needs besides the shared weights and pool: its CUDA/MPS context, XLA's
# workspace and the activations of the largest step. A first estimate; bench_disagg.py measures it.
WORKER_RESERVE_BYTES = 3 << 30


def worker_specs(config: EngineConfig) -> list[tuple[WorkerSpec, int]]:
    """The holder (loads and owns the shared memory), the aggregate worker (all SMs: mixed steps, and a phase
    alone), then a decode and a prefill worker per rung of the ladder."""
    shapes = StepShapes(prefill_seqs=config.max_prefill_seqs, min_table_blocks=config.min_table_blocks)
    warmup = None
    if config.warmup:
        warmup = {"max_decode_rows": config.max_num_seqs, "max_prefill_tokens": config.max_num_batched_tokens,
                  "max_blocks": -(-(config.max_model_len or 8192) // config.block_size),
                  "num_scheduler_steps": config.num_scheduler_steps}
    base = dict(model=config.model, dtype=config.dtype, seed=config.seed, params_cache_dir=config.params_cache_dir,
                block_size=config.block_size, num_blocks=config.num_kv_blocks,
                memory_utilization=config.gpu_memory_utilization, cpu_kv_tokens=config.cpu_kv_cache_tokens,
                kernel_impl=config.kernel_impl, shapes=shapes)
    num_workers = 1 + 2 * len(config.sm_ladder)
    specs = [(WorkerSpec(HOLDER, env=(("XLA_PYTHON_CLIENT_ALLOCATOR", "platform"),),
                         reserve_bytes=num_workers * WORKER_RESERVE_BYTES, **base), 100),
             # The aggregate worker runs mixed steps (rows x tokens x widths programs, compiled on parallel threads).
             (WorkerSpec(AGGREGATE, warmup=None if warmup is None or not config.aggregate_when_safe
                         else warmup, **base), 100)]
    for share in config.sm_ladder:
        # Each phase worker compiles only its phase's shapes.
        dw = None if warmup is None else {**warmup, "max_prefill_tokens": 0, "mixed": False}
        pw = None if warmup is None else {**warmup, "max_decode_rows": 0, "mixed": False}
        specs.append((WorkerSpec(decode_worker(share), warmup=dw, **base), share))
        specs.append((WorkerSpec(prefill_worker(share), warmup=pw, **base), 100 - share))
    return specs


def build_engine(config: EngineConfig) -> DisaggEngine | None:
    from runner.model.loader import load_model
    from runner.workers.mps import try_start_mps

    # If anything in this process starts a JAX GPU client later, it must not take 75% of the memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    mps = try_start_mps()
    if mps is None and config.disaggregation == "auto":
        return None  # try_start_mps warned once
    if mps is None:
        log.warning("disaggregation='on' without MPS: prefill and decode run in separate processes, but their SM "
                    "shares are not enforced (a test and debugging form)")
    cache_dir = config.compilation_cache_dir or str(Path.home() / ".cache" / "nexus_jax" / "xla")
    try:
        pool = WorkerPool(worker_specs(config), mps_env=mps.client_env if mps else None,
                          compilation_cache_dir=cache_dir)
    except WorkerError as e:
        if mps is not None:
            mps.stop()
        if config.disaggregation == "auto":
            log.warning("disaggregated workers failed to start (%s); running aggregated", str(e).splitlines()[0])
            return None
        raise
    try:
        loaded = load_model(config.model, config.dtype, cache_dir=config.params_cache_dir, with_params=False)
        mc = loaded.config
        device = pool.workers[AGGREGATE].info()["device_kind"]
        controller = PartitionController(_cost_model(config, mc, device, loaded.name), config.sm_ladder,
                                         Slo(ttft=config.slo_ttft, tbt=config.slo_tbt),
                                         allow_aggregate=config.aggregate_when_safe)
        num_blocks = pool.shared.kv_shape[2]
        if config.max_model_len is not None and config.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context "
                             f"({mc.max_position_embeddings})")
        max_len = min(config.max_model_len or mc.max_position_embeddings, num_blocks * config.block_size)
        tokenizer = load_tokenizer(loaded)
        engine = DisaggEngine(config, pool, controller, tokenizer, max_model_len=max_len,
                              vocab_size=mc.vocab_size, eos_token_ids=eos_token_ids(loaded, tokenizer),
                              sm_enforced=mps is not None)
    except BaseException:
        pool.close()
        if mps is not None:
            mps.stop()
        raise
    engine.mps = mps
    engine.device_kind = device
    engine.restart_pool = lambda: _restart_pool(engine, config, cache_dir)
    return engine


def _restart_pool(engine: DisaggEngine, config: EngineConfig, cache_dir: str) -> WorkerPool:
    """The pool again from scratch, after a fault took the holder or the MPS daemon; a dead daemon that this
    engine started is started again (its clients all died with it)."""
    from runner.workers.mps import try_start_mps

    mps = engine.mps
    if mps is not None and not mps.alive():
        mps.stop()
        engine.mps = mps = try_start_mps()
        if mps is None:
            raise WorkerError("the MPS daemon died and does not start again (see the warning above)")
    return WorkerPool(worker_specs(config), mps_env=mps.client_env if mps else None, compilation_cache_dir=cache_dir)


def _cost_model(config: EngineConfig, model_config, device: str, model_name: str) -> CostModel:
    path = config.cost_model_path or profile_path(device, model_name)
    if os.path.isfile(path):
        log.info("partition cost model: %s", path)
        return CostModel.load(path)
    if config.cost_model_path:
        raise FileNotFoundError(f"cost_model_path {config.cost_model_path} does not exist")
    log.warning("no latency profile at %s (run `nexus-jax profile`); the partition controller uses an unprofiled "
                "roofline estimate", path)
    return CostModel.analytic(model_config, _DEFAULT_PEAK_FLOPS, _DEFAULT_HBM_BW)
