"""Builds the engine an EngineConfig describes: the aggregated engine (one process, chunked prefill), or with
config.disaggregation the prefill/decode worker processes (see nexus_jax.disagg.setup), falling back to the
aggregated engine where "auto" finds no MPS."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from nexus_jax.core.config import EngineConfig
from nexus_jax.core.engine import LLMEngine
from nexus_jax.core.loading import load_checked, model_facts
from nexus_jax.disagg.setup import build_disaggregated

if TYPE_CHECKING:
    from runner.model_runner import ModelRunner

log = logging.getLogger(__name__)


def build_engine(config: EngineConfig) -> LLMEngine:
    if config.disaggregation != "off":
        engine = build_disaggregated(config)
        if engine is not None:
            return engine
    return _aggregated(config)


def _aggregated(config: EngineConfig) -> LLMEngine:
    """The engine over a ModelRunner in this process, on config.device."""
    import jax

    # Imported here: the model's code is needed only where the engine runs it, not by every user of nexus_jax.
    from runner.compilation_cache import use_compilation_cache
    from runner.model_runner import ModelRunner, on_device
    from runner.program_store import beside_compilation_cache
    from runner.step_batch import StepShapes

    if config.compilation_cache_dir is not None:
        # Process-wide: an engine started after other compilations may not use it.
        use_compilation_cache(config.compilation_cache_dir)
    device = None
    if config.device is not None:
        devices = jax.devices()
        if config.device >= len(devices):
            raise ValueError(f"device {config.device} does not exist: JAX sees {len(devices)} device(s), "
                             f"indices 0..{len(devices) - 1}")
        device = devices[config.device]
    # XLA's allocator reserves its share of the GPU at the process's first allocation (1.1 s on an H100 with
    # preallocation, 0.004 s without: RESULTS.md): made on a thread now, it overlaps reading the checkpoint and
    # tracing the first programs instead of stalling the first weight that reaches the device.
    threading.Thread(target=_first_allocation, args=(device,), name="first-allocation", daemon=True).start()
    with on_device(device):  # the weights are read or generated straight onto the engine's device
        loaded = load_checked(config, with_params=True)
    params, loaded.params = loaded.params, None
    runner = ModelRunner(loaded.config, params, num_blocks=config.num_kv_blocks, block_size=config.block_size,
                         kernel_impl=config.kernel_impl, release_params=True,
                         memory_utilization=config.gpu_memory_utilization,
                         cpu_kv_tokens=config.cpu_kv_cache_tokens,
                         shapes=StepShapes(prefill_seqs=config.max_prefill_seqs,
                                           min_table_blocks=config.min_table_blocks), device=device,
                         program_store=beside_compilation_cache())
    del params
    facts = model_facts(config, loaded, runner.num_blocks)
    if config.warmup:
        _warmup(config, runner, facts.max_model_len)
    engine = LLMEngine(config, runner, facts.tokenizer, max_model_len=facts.max_model_len,
                       vocab_size=facts.vocab_size, eos_token_ids=facts.eos_token_ids)
    # One step moves at most what the pool or the host memory (swap space and host tier) holds.
    host_blocks = sum(space.num_blocks for space in (engine.scheduler.swap_space, engine.scheduler.host_cache)
                      if space is not None)
    if config.warmup and host_blocks:
        log.info("compiled %d swap programs ahead of time", runner.warmup_swap(min(runner.num_blocks, host_blocks)))
    return engine


def _first_allocation(device) -> None:
    import jax
    import numpy as np

    try:
        jax.device_put(np.zeros((), np.int8), device).block_until_ready()
    except Exception:  # the engine's own first allocation meets the same error and reports it
        log.debug("first allocation on a thread failed", exc_info=True)


def _warmup(config: EngineConfig, runner: ModelRunner, max_len: int) -> None:
    start = time.monotonic()
    max_blocks = -(-max_len // config.block_size)
    widths = runner.shapes.table_widths(max_blocks)
    if len(widths) > 2:  # each width multiplies the programs: 8 widths took ~10 minutes on the 8B shape
        log.warning("warm-up compiles every step shape for %d block-table widths (%s blocks); a smaller "
                    "max_model_len or a larger min_table_blocks compiles fewer", len(widths),
                    ", ".join(map(str, widths)))
    n = runner.warmup(config.max_num_seqs, config.max_num_batched_tokens, max_blocks,
                      num_scheduler_steps=config.num_scheduler_steps)
    log.info("compiled %d step programs ahead of time in %.1f s", n, time.monotonic() - start)
