"""Builds the disaggregated engine: MPS, the ladder of warm workers, the cost model and the controller.

`build_disaggregated` returns None when the configuration asks for "auto" and MPS cannot be used, after one warning:
the caller then builds the aggregated engine. The engine process itself never initialises the GPU (a JAX client
there would grab device memory and could not be an MPS client of the right share); workers do all device work.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from nexus_jax.core.config import EngineConfig
from nexus_jax.core.loading import load_checked, model_facts
from nexus_jax.disagg.cost_model import CostModel, profile_path
from nexus_jax.disagg.engine import DisaggEngine
from nexus_jax.disagg.goodput import SharedWeightDecode
from nexus_jax.disagg.ladder import AGGREGATE, HOLDER, SmLadder
from nexus_jax.disagg.partition import LatencyModel, PartitionController, Slo
from runner.step_batch import StepShapes
from runner.workers.mps import MpsControl, try_start_mps
from runner.workers.pool import WorkerError, WorkerPool
from runner.workers.worker import WORKER_RESERVE_BYTES, WorkerSpec

log = logging.getLogger(__name__)

# Used to rank splits when no profile of this GPU and model exists: datasheet dense bf16 FLOP/s and HBM bytes/s,
# by a name the device kind contains (first match); unknown GPUs get the H100 SXM's.
DATASHEETS = (("H200", 989e12, 4.8e12), ("H100", 989e12, 3.35e12), ("A100", 312e12, 2.0e12))



def worker_specs(config: EngineConfig, ladder: SmLadder, mps: MpsControl | None) -> list[WorkerSpec]:
    """The holder (loads and owns the shared memory), the aggregate worker (all SMs: mixed steps, and a phase
    alone), then a decode and a prefill worker per rung of the ladder; each with its MPS environment."""
    shapes = StepShapes(prefill_seqs=config.max_prefill_seqs, min_table_blocks=config.min_table_blocks)
    warmup = None
    if config.warmup:
        warmup = {"max_decode_rows": config.max_num_seqs, "max_prefill_tokens": config.max_num_batched_tokens,
                  "max_blocks": -(-(config.max_model_len or 8192) // config.block_size),
                  "num_scheduler_steps": config.num_scheduler_steps}
    # The aggregate worker runs mixed steps (rows x tokens x widths programs, compiled on parallel threads); each
    # phase worker compiles only its phase's shapes.
    warmups = {AGGREGATE: warmup if config.aggregate_when_safe else None,
               "decode": None if warmup is None else {**warmup, "max_prefill_tokens": 0, "mixed": False},
               "prefill": None if warmup is None else {**warmup, "max_decode_rows": 0, "mixed": False}}
    base = dict(model=config.model, dtype=config.dtype, seed=config.seed, params_cache_dir=config.params_cache_dir,
                block_size=config.block_size, num_blocks=config.num_kv_blocks,
                memory_utilization=config.gpu_memory_utilization, cpu_kv_tokens=config.cpu_kv_cache_tokens,
                kernel_impl=config.kernel_impl, shapes=shapes)
    # Decode reads every weight each step, from the arena over IPC 1.6x slower than from XLA's own memory
    # (RESULTS.md): the workers that decode may copy them; prefill is compute-bound and keeps the shared ones. The
    # aggregate worker runs nothing without aggregate_when_safe: a copy there would only take the decode workers'
    # room (on an 80 GB H100 the static split's decode read shared weights for it, RESULTS.md 2026-12-07).
    # Most useful first, for a holder with room for only some copies: the decode workers, widest share first (they
    # decode beside a prefill), then the aggregate worker (mostly mixed steps, whose GEMMs are compute-bound).
    roles = {AGGREGATE, "decode"} if config.aggregate_when_safe else {"decode"}
    copiers = tuple(w.name for w in sorted((w for w in ladder.workers if w.role in roles),
                                           key=lambda w: (w.role == AGGREGATE, -w.sm_percent)))
    specs = []
    for w in ladder.workers:
        env = tuple(ladder.env(w.name, mps).items())
        if w.role == HOLDER:  # the platform allocator returns what loading used; the pool leaves the others room
            specs.append(WorkerSpec(w.name, env=(("XLA_PYTHON_CLIENT_ALLOCATOR", "platform"), *env),
                                    reserve_bytes=(len(ladder.workers) - 1) * WORKER_RESERVE_BYTES,
                                    decode_weights=config.decode_weights,
                                    weight_copiers=copiers, **base))
        else:
            specs.append(WorkerSpec(w.name, warmup=warmups[w.role], env=env, **base))
    return specs


def make_controller(config: EngineConfig, cost_model: LatencyModel, ladder: SmLadder) -> PartitionController:
    """The partition controller of `config`: its SLOs (both count in every decision) and whether it may aggregate."""
    return PartitionController(cost_model, ladder, Slo(ttft=config.slo_ttft, tbt=config.slo_tbt),
                               allow_aggregate=config.aggregate_when_safe,
                               paced_first_token=config.pace_first_token and config.decode_loop == "engine")


def build_disaggregated(config: EngineConfig) -> DisaggEngine | None:
    """The disaggregated engine of `config`, or None where "auto" falls back to the in-process engine."""
    # If anything in this process starts a JAX GPU client beside the workers, it must not take 75% of the memory up
    # front. The in-process engine that runs instead is the GPU's only user and preallocates as usual: growing,
    # XLA's allocator left it a 2.3x smaller pool on an H100 and failed to allocate it on an H200 (RESULTS.md).
    ours = "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    engine = None
    try:
        engine = _build_disaggregated(config)
        return engine
    finally:
        if engine is None and ours:
            os.environ.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)


def _build_disaggregated(config: EngineConfig) -> DisaggEngine | None:
    mps = try_start_mps()
    if mps is None and config.disaggregation == "auto":
        return None  # try_start_mps warned once
    if mps is None:
        log.warning("disaggregation='on' without MPS: prefill and decode run in separate processes, but their SM "
                    "shares are not enforced (a test and debugging form)")
    ladder = SmLadder(config.sm_ladder, config.split_prefill_share)
    cache_dir = config.compilation_cache_dir or str(Path.home() / ".cache" / "nexus_jax" / "xla")

    def start_pool(mps: MpsControl | None) -> WorkerPool:
        return WorkerPool(worker_specs(config, ladder, mps), compilation_cache_dir=cache_dir)

    try:
        pool = start_pool(mps)
    except WorkerError as e:
        if mps is not None:
            mps.stop()
        if config.disaggregation == "auto":
            log.warning("disaggregated workers failed to start (%s); running aggregated", str(e).splitlines()[0])
            return None
        raise
    on_shared = [w for w in ladder.workers if w.role in (AGGREGATE, "decode") and
                 w.name not in pool.shared.private_workers] if pool.shared.device_bytes else []
    if mps is not None and config.decode_weights == "auto" and on_shared:
        log.warning("decode_weights='auto': no room for weight copies of %s (the KV pool would lose more than half), "
                    "so they read the holder's weights over CUDA IPC, which decoded 1.6-1.8x slower than on a copy; "
                    "the partition controller counts that. Raise gpu_memory_utilization, shorten sm_ladder, or set "
                    "decode_weights='private'", ", ".join(w.name for w in on_shared))
    try:
        loaded = load_checked(config, with_params=False)
        device = pool.workers[AGGREGATE].info()["device_kind"]
        cost = _cost_model(config, loaded.config, device, loaded.name)
        if on_shared:  # a profile measures decode on a worker's own weights
            cost = SharedWeightDecode(cost, frozenset(w.sm_percent for w in on_shared))
        controller = make_controller(config, cost, ladder)
        facts = model_facts(config, loaded, pool.shared.kv_shape[2])
        return DisaggEngine(config, pool, controller, facts.tokenizer, max_model_len=facts.max_model_len,
                            vocab_size=facts.vocab_size, eos_token_ids=facts.eos_token_ids, mps=mps,
                            device_kind=device, restart_pool=lambda old: _restart_pool(old, start_pool))
    except BaseException:
        pool.close()
        if mps is not None:
            mps.stop()
        raise


def _restart_pool(mps: MpsControl | None, start_pool: Callable[[MpsControl | None], WorkerPool]
                  ) -> tuple[WorkerPool, MpsControl | None]:
    """The pool again from scratch, after a fault took the holder or the MPS daemon; a dead daemon that this
    engine started is started again (its clients all died with it)."""
    restarted = mps is not None and not mps.alive()
    if restarted:
        mps.stop()
        mps = try_start_mps()
        if mps is None:
            raise WorkerError("the MPS daemon died and does not start again (see the warning above)")
    try:
        return start_pool(mps), mps
    except BaseException:
        if restarted:  # the engine keeps the old daemon (stopped), so this one is stopped here
            mps.stop()
        raise


def _cost_model(config: EngineConfig, model_config, device: str, model_name: str) -> CostModel:
    path = config.cost_model_path or profile_path(device, model_name)
    if os.path.isfile(path):
        log.info("partition cost model: %s", path)
        return CostModel.load(path)
    if config.cost_model_path:
        raise FileNotFoundError(f"cost_model_path {config.cost_model_path} does not exist")
    name, flops, bandwidth = datasheet(device)
    log.warning("no latency profile at %s (run `nexus-jax profile`); the partition controller uses an unprofiled "
                "roofline estimate from the %s datasheet (%.0f TFLOP/s bf16, %.2f TB/s) for %s", path, name,
                flops / 1e12, bandwidth / 1e12, device)
    return CostModel.analytic(model_config, flops, bandwidth)


def datasheet(device_kind: str) -> tuple[str, float, float]:
    """(name, peak dense bf16 FLOP/s, HBM bytes/s) of the GPU `device_kind` names, or the H100's."""
    for entry in DATASHEETS:
        if entry[0].lower() in device_kind.lower():
            return entry
    return DATASHEETS[1]
