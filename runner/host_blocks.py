"""The runner's host memory for KV blocks (the swap space and the prefix cache's host tier): one array per block, in
pinned host memory.

Why not one numpy array laid out like the pool: a 4K-token context of the 8B shape is 537 MB, and restoring it
from a pageable array cost a host gather (a numpy fancy index, one thread: 103 ms on an H100 host) and a pageable
copy to the device (90 ms), more than recomputing the context; the same bytes from pinned memory moved in 10.5 ms
(benchmarks/bench_host_tier.py, RESULTS.md). With a pinned array per block a copy-in is one transfer of exactly its
blocks, with no host gather, and a copy-out one transfer of the blocks a device program split out of the pool.
Every copy is asynchronous: the runtime orders a copy-in after the copy-out that wrote its block, so the host
never waits for one.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from runner import programs
from runner.step_batch import bucket


class HostBlocks:
    """Host blocks 0 .. num_blocks - 1, each [L, 2, Hkv, block_size, D] like one block of the pool (axis 2)."""

    def __init__(self, num_blocks: int, block_shape: tuple[int, ...], dtype, device: jax.Device):
        self.num_blocks = num_blocks
        kinds = {m.kind for m in device.addressable_memories()}
        self._device = jax.sharding.SingleDeviceSharding(device)
        # A platform without pinned host memory keeps the blocks in device memory (on CPU that is host memory).
        self._host = (jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
                      if "pinned_host" in kinds else self._device)
        self._blocks: list[jax.Array | None] = [None] * num_blocks
        self._zero = jax.device_put(jnp.zeros(block_shape, dtype), self._device)  # never written; padding

    def store(self, kv_pool: jax.Array, device_blocks: Sequence[int], host_blocks: Sequence[int]) -> None:
        """Copies pool blocks out to host blocks (pairs in order: a later pair to the same host block wins)."""
        for host in host_blocks:
            self._check(host)
        split = programs.split_blocks(kv_pool, pad_blocks(device_blocks, 0))
        moved = jax.device_put(list(split[:len(device_blocks)]), self._host)
        for host, block in zip(host_blocks, moved):
            self._blocks[host] = block

    def load(self, host_blocks: Sequence[int]) -> tuple[jax.Array, ...]:
        """The host blocks on the device, padded with zero blocks to the bucket the scatter is compiled for."""
        for host in host_blocks:
            self._check(host)
        held = [self._blocks[h] if self._blocks[h] is not None else self._zero for h in host_blocks]
        on_device = jax.device_put(held, self._device)
        padding = bucket(len(host_blocks), programs.MIN_SWAP_BLOCKS) - len(host_blocks)
        return tuple(on_device) + (self._zero,) * padding

    def read(self, host_blocks: Sequence[int]) -> np.ndarray:
        """The host blocks as one numpy array [L, 2, n, Hkv, block_size, D] (tests and debugging: it waits)."""
        return np.stack([np.asarray(self._blocks[h] if self._blocks[h] is not None else self._zero)
                         for h in host_blocks], axis=2)

    def _check(self, host: int) -> None:
        if not 0 <= host < self.num_blocks:
            raise ValueError(f"host block {host} is outside 0..{self.num_blocks - 1}")


def pad_blocks(ids: Sequence[int], fill: int) -> np.ndarray:
    """Block ids padded with `fill` to their bucket (one compiled program per bucket)."""
    out = np.full(bucket(len(ids), programs.MIN_SWAP_BLOCKS), fill, np.int32)
    out[:len(ids)] = ids
    return out
