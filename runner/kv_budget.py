"""How many KV blocks fit on a device: its memory limit, what the allocator already holds, and the headroom the
steps need."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from runner.model.config import ModelConfig


def fit_num_blocks(config: ModelConfig, block_size: int, dtype: Any, memory_utilization: float,
                   cpu_tokens: int, device: jax.Device | None = None) -> int:
    """KV blocks that fit in `memory_utilization` of `device`'s memory (default: the first device) once the
    weights are resident.

    A device that reports no memory limit (CPU) gets `cpu_tokens` worth of blocks.
    """
    per_block = kv_bytes_per_block(config, block_size, dtype)
    stats = (device or jax.devices()[0]).memory_stats() or {}
    if "bytes_limit" not in stats:
        return max(1, cpu_tokens // block_size)
    total, used = stats["bytes_limit"], allocator_used_bytes(stats)
    # Keep headroom for the step's activations and logits: a tenth of what is left, at least 1 GiB.
    headroom = max((total * memory_utilization - used) * 0.1, 1 << 30)
    return kv_blocks_in_budget(total, used, memory_utilization, headroom, per_block)


def allocator_used_bytes(stats: dict[str, int]) -> int:
    """The bytes of a device's limit that a new allocation as large as the KV pool cannot use.

    With XLA_PYTHON_CLIENT_PREALLOCATE=false the allocator grows region by region, doubling their size, and the pool
    needs a region of its own: what is left for it is the limit less every region reserved so far (`pool_bytes`),
    not less the bytes in use. On an H200 the 8B engine at 0.9 sized its pool from bytes in use and ran out
    allocating it (RESULTS.md, 2026-12-07). Preallocated, the one region is the whole limit and its free space
    serves the pool.
    """
    in_use, reserved = stats.get("bytes_in_use", 0), stats.get("pool_bytes", 0)
    return max(in_use, reserved) if reserved < stats["bytes_limit"] else in_use


def kv_blocks_in_budget(total: float, used: float, utilization: float, reserve: float, bytes_per_block: int) -> int:
    """KV blocks that fit in `utilization` of a device's `total` bytes beside the `used` bytes and a `reserve`
    kept free; raises ValueError when not even one fits."""
    budget = total * utilization - used - reserve
    blocks = int(budget // bytes_per_block)
    if blocks < 1:
        gib = 2**30
        raise ValueError(f"no device memory left for the KV pool: {utilization:g} of {total / gib:.1f} GiB, "
                         f"{used / gib:.1f} GiB in use, {reserve / gib:.1f} GiB kept free for the steps; raise "
                         f"gpu_memory_utilization or set num_kv_blocks")
    return blocks


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: Any) -> int:
    """K and V of every layer for one block of `block_size` tokens."""
    return 2 * config.num_layers * config.num_kv_heads * block_size * config.head_dim * jnp.dtype(dtype).itemsize
