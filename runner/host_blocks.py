"""The runner's host memory for KV blocks (the swap space and the prefix cache's host tier): one array per block, in
pinned host memory.

Why not one numpy array laid out like the pool: a 4K-token context of the 8B shape is 537 MB, and restoring it
from a pageable array cost a host gather (a numpy fancy index, one thread: 103 ms on an H100 host) and a pageable
copy to the device (90 ms), more than recomputing the context; the same bytes from pinned memory moved in 10.5 ms
(benchmarks/bench_host_tier.py, RESULTS.md). With a pinned array per block a copy-in is one transfer of exactly its
blocks, with no host gather, and a copy-out one transfer of the blocks a device program split out of the pool.
Every copy is asynchronous: the runtime orders a copy-in after the copy-out that wrote its block, so the host
never waits for one.

Each array moved also costs ~0.1 ms beside its bytes (256 block arrays back in 39.7 ms, the same bytes as one array
in 10.9 ms), so the host tier's blocks come in runs (nexus_jax.core.host_runs): a run written completely by one call
is kept as one array, moved as one array each way, and dropped when one of its blocks is written alone (the host
cache reuses a whole run's blocks only once all of them are free).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from runner import programs
from runner.step_batch import bucket


@dataclasses.dataclass
class CopyIn:
    """Host blocks on their way to the device (the transfers issued), and the pool blocks they go to."""
    blocks: np.ndarray            # pool block of each single block, padded with the pool's size (dropped)
    values: tuple[jax.Array, ...]
    runs: np.ndarray              # [k, run]: pool block of each block of each run array, the same padding
    run_values: tuple[jax.Array, ...]


class HostBlocks:
    """Host blocks 0 .. num_blocks - 1, each [L, 2, Hkv, block_size, D] like one block of the pool (axis 2); from
    `run_from` on, in aligned runs of `run` blocks."""

    def __init__(self, num_blocks: int, block_shape: tuple[int, ...], dtype, device: jax.Device,
                 run_from: int = 0, run: int = 1):
        self.num_blocks, self.run_from, self.run = num_blocks, run_from, run
        kinds = {m.kind for m in device.addressable_memories()}
        self._device = jax.sharding.SingleDeviceSharding(device)
        # A platform without pinned host memory keeps the blocks in device memory (on CPU that is host memory).
        self._host = (jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
                      if "pinned_host" in kinds else self._device)
        self._blocks: list[jax.Array | None] = [None] * num_blocks
        self._runs: dict[int, jax.Array] = {}  # the whole runs, by index
        self._zero = jax.device_put(jnp.zeros(block_shape, dtype), self._device)  # never written; padding

    def run_of(self, host: int) -> int | None:
        """The full-length run holding host block `host`, or None (single blocks, the tail, the swap space)."""
        if self.run == 1 or host < self.run_from:
            return None
        r = (host - self.run_from) // self.run
        return r if self.run_from + (r + 1) * self.run <= self.num_blocks else None

    def _run_blocks(self, r: int) -> range:
        return range(self.run_from + r * self.run, self.run_from + (r + 1) * self.run)

    def store(self, kv_pool: jax.Array, device_blocks: Sequence[int], host_blocks: Sequence[int]) -> None:
        """Copies pool blocks out to host blocks (pairs in order: a later pair to the same host block wins); each
        run whose every block is written here becomes one array."""
        for host in host_blocks:
            self._check(host)
        pairs = dict(zip((int(h) for h in host_blocks), (int(d) for d in device_blocks)))
        by_run: dict[int, dict[int, int]] = {}
        for host, dev in pairs.items():
            r = self.run_of(host)
            if r is not None:
                by_run.setdefault(r, {})[host] = dev
        whole = [r for r, written in by_run.items() if len(written) == self.run]
        if whole:
            rows = [[by_run[r][h] for h in self._run_blocks(r)] for r in whole]
            rows += [rows[0]] * (bucket(len(rows)) - len(rows))  # padding rows: outputs not kept
            split = programs.split_runs(kv_pool, np.asarray(rows, np.int32))
            for r, array in zip(whole, jax.device_put(list(split[:len(whole)]), self._host)):
                self._runs[r] = array
                for h in self._run_blocks(r):
                    self._blocks[h] = None
                    del pairs[h]
        if not pairs:
            return
        for host in pairs:
            self._runs.pop(self.run_of(host), None)  # a block written alone: the rest of its run is free
        split = programs.split_blocks(kv_pool, pad_blocks(list(pairs.values()), 0))
        for host, block in zip(pairs, jax.device_put(list(split[:len(pairs)]), self._host)):
            self._blocks[host] = block

    def load(self, host_blocks: Sequence[int], device_blocks: Sequence[int], pool_blocks: int) -> CopyIn:
        """Starts moving host blocks to the device, for `write` to put into pool blocks `device_blocks`: a whole
        run as one array (blocks of it nobody asked for are dropped there), other blocks one array each."""
        for host in host_blocks:
            self._check(host)
        singles: dict[int, int] = {}
        rows: dict[int, np.ndarray] = {}
        for host, dev in zip((int(h) for h in host_blocks), (int(d) for d in device_blocks)):
            r = self.run_of(host)
            if r in self._runs:
                row = rows.setdefault(r, np.full(self.run, pool_blocks, np.int32))
                row[host - self._run_blocks(r).start] = dev
            else:
                singles[host] = dev
        held = [self._blocks[h] if self._blocks[h] is not None else self._zero for h in singles]
        values: tuple[jax.Array, ...] = ()
        if held:
            values = tuple(jax.device_put(held, self._device))
            values += (self._zero,) * (bucket(len(held), programs.MIN_SWAP_BLOCKS) - len(held))
        run_values = tuple(jax.device_put([self._runs[r] for r in rows], self._device))
        padding = bucket(len(rows)) - len(rows) if rows else 0  # the first run again, every block dropped
        runs = np.stack([*rows.values(), *[np.full(self.run, pool_blocks, np.int32)] * padding]) if rows else \
            np.zeros((0, self.run), np.int32)
        return CopyIn(pad_blocks(list(singles.values()), pool_blocks), values, runs,
                      run_values + run_values[:1] * padding)

    def write(self, kv_pool: jax.Array, copy: CopyIn) -> jax.Array:
        """The pool with the copied-in blocks written (donated: the pool stays in place)."""
        if copy.values:
            kv_pool = programs.scatter_blocks(kv_pool, copy.blocks, copy.values)
        if copy.run_values:
            kv_pool = programs.scatter_runs(kv_pool, copy.runs, copy.run_values)
        return kv_pool

    def warmup(self, kv_pool: jax.Array, max_blocks: int) -> int:
        """Compiles the run copies of every run-count bucket up to max_blocks blocks; returns how many programs."""
        count, n = 0, 1
        full_runs = max(0, (self.num_blocks - self.run_from) // self.run) if self.run > 1 else 0
        most = min(full_runs, max_blocks // self.run)  # whole runs one call moves
        while most and n <= bucket(most):
            runs = np.zeros((n, self.run), np.int32)
            values = (jax.ShapeDtypeStruct(self._zero.shape[:2] + (self.run,) + self._zero.shape[2:],
                                           self._zero.dtype),) * n
            programs.split_runs.lower(kv_pool, runs).compile()
            programs.scatter_runs.lower(kv_pool, runs, values).compile()
            count, n = count + 2, n * 2
        return count

    def read(self, host_blocks: Sequence[int]) -> np.ndarray:
        """The host blocks as one numpy array [L, 2, n, Hkv, block_size, D] (tests and debugging: it waits)."""
        return np.stack([self._read(int(h)) for h in host_blocks], axis=2)

    def _read(self, host: int) -> np.ndarray:
        r = self.run_of(host)
        if r in self._runs:
            return np.asarray(self._runs[r])[:, :, host - self._run_blocks(r).start]
        return np.asarray(self._blocks[host] if self._blocks[host] is not None else self._zero)

    def _check(self, host: int) -> None:
        if not 0 <= host < self.num_blocks:
            raise ValueError(f"host block {host} is outside 0..{self.num_blocks - 1}")


def pad_blocks(ids: Sequence[int], fill: int) -> np.ndarray:
    """Block ids padded with `fill` to their bucket (one compiled program per bucket)."""
    out = np.full(bucket(len(ids), programs.MIN_SWAP_BLOCKS), fill, np.int32)
    out[:len(ids)] = ids
    return out
