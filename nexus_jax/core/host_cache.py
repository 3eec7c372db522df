"""The host-memory tier of the prefix cache: cached blocks evicted from the device pool keep their K/V in host memory.

Agents re-send most of their context on every call, and a program's blocks are evicted from a busy pool while it
thinks or waits for a tool; recomputing them costs a prefill, copying them back costs one transfer. When the pool
evicts a keyed block, its K/V is copied to a host block under the same key; when a prompt's prefix match continues
past the device pool into keys held here, those blocks get fresh device blocks and are copied back before the step
that reads them. The host tier evicts in the pool's order (nexus_jax.core.retention: LRU, or by program under a
program-aware policy); a full one drops what ranks lowest, the incoming block included, so it never refuses a
block and never fails a request (a dropped block is recomputed). Host blocks come in runs (nexus_jax.core.host_runs):
the blocks a plan evicts fill whole runs, each kept and moved as one array, and leave together.

Like SwapSpace, this class only books host blocks: the copies it lists go into the scheduler's plan (`swap_out`,
`swap_in`) and the executor's `swap_blocks` moves the data, before the plan's step, in dispatch order. A copy-out
reads a device block with no holder, whose K/V no step writes; a copy-in is read by no step before its plan's.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

from nexus_jax.core.host_runs import HostRuns
from nexus_jax.core.retention import EvictionOrder
from nexus_jax.core.swap_space import SwapSpace


class HostCache:
    """Host blocks `first_block .. first_block + num_blocks - 1` of the executor's host memory, by block key."""

    def __init__(self, num_blocks: int, first_block: int = 0, run: int = 1):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"a host cache needs a positive number of host blocks, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._runs = HostRuns(num_blocks, first_block, run)  # which host block a copy-out takes
        self._entries: dict[bytes, int] = {}  # key -> host block
        self._key_at: dict[int, bytes] = {}  # host block -> key, of the entries
        self.order = EvictionOrder()  # of the keys, as the device pool's
        # Keys copied out by the plan being built: the executor reads copy-ins before it writes copy-outs, so these
        # are not matchable until that plan is dispatched.
        self._pending: set[bytes] = set()
        self._out: list[tuple[int, int]] = []  # (device, host) copies of the plan being built
        self._in: list[tuple[int, int]] = []   # (host, device)
        self._released: list[int] = []         # host blocks copied in by that plan, free once it is dispatched
        self.num_stores = self.num_evictions = self.num_dropped = 0
        self.num_hit_blocks = 0

    @property
    def num_used_blocks(self) -> int:
        return self._runs.num_used

    def store(self, device_block: int, key: bytes, owner: Hashable = None) -> None:
        """Books the copy-out of an evicted device block (the block manager's hook); `owner` released it last."""
        if key in self._entries:  # a copy is here already (the prompt recomputed it): keep that one
            self.order.remove(key)
            self.order.add(key, owner)
            return
        self.order.add(key, owner)
        host = self._runs.take()
        while host is None:
            victim, _ = self.order.pop()
            if victim == key:  # it ranks below everything held (or every host block is being copied in)
                self.num_dropped += 1
                return
            if victim in self._pending:  # its copy-out is not dispatched yet: cancelled, its host block reused
                host = self._drop(victim)
                self._pending.discard(victim)
                self._out.remove(next(copy for copy in self._out if copy[1] == host))
                break
            run = self._runs.run_of(self._entries[victim])
            # A whole run is one host array: its blocks leave together, and only then is any of them reusable.
            victims = [self._key_at[b] for b in self._runs.blocks_of(run) if b in self._key_at] \
                if self._runs.is_whole(run) else [victim]
            for other in victims:
                if other != victim:
                    self.order.remove(other)
                self._runs.release(self._drop(other))
            host = self._runs.take()
        self._entries[key] = host
        self._key_at[host] = key
        self._pending.add(key)
        self._out.append((device_block, host))
        self.num_stores += 1

    def _drop(self, key: bytes) -> int:
        """Evicts an entry (out of the order already); returns its host block."""
        host = self._entries.pop(key)
        del self._key_at[host]
        self.num_evictions += 1
        return host

    def readable(self, key: bytes) -> bool:
        """Whether a block of this key can be copied back by the plan being built."""
        return key in self._entries and key not in self._pending

    def take(self, keys: Sequence[bytes]) -> list[tuple[int, Hashable]]:
        """Removes matched entries before their device blocks are allocated (which may store, and so evict, here);
        returns their host blocks and owners, for `restore` or `put_back`."""
        taken = [(self._entries.pop(key), self.order.remove(key)) for key in keys]
        for host, _ in taken:
            del self._key_at[host]
        return taken

    def put_back(self, keys: Sequence[bytes], taken: Sequence[tuple[int, Hashable]]) -> None:
        """Returns taken entries whose request found no device room."""
        for key, (host, owner) in zip(keys, taken):
            self._entries[key] = host
            self._key_at[host] = key
            self.order.add(key, owner)

    def restore(self, taken: Sequence[tuple[int, Hashable]], device_blocks: Sequence[int]) -> None:
        """Books the copy-in of taken host blocks into device blocks; the host copies are dropped (the device
        blocks now hold the keys)."""
        hosts = [host for host, _ in taken]
        self._in.extend(zip(hosts, device_blocks))
        self._released.extend(hosts)
        self.num_hit_blocks += len(hosts)

    def flush(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The (copy-outs, copy-ins) of the plan just built, which the caller dispatches before its step."""
        copies = self._out, self._in
        for host in self._released:
            self._runs.release(host)
        self._runs.seal()
        self._out, self._in, self._released = [], [], []
        self._pending.clear()
        return copies

    def clear(self) -> None:
        """Forgets every entry (their K/V is lost or stale: a failed copy, a reset of the prefix cache)."""
        self.flush()
        for host in self._entries.values():
            self._runs.release(host)
        self._entries.clear()
        self._key_at.clear()
        self.order.clear()

    def stats(self) -> dict[str, int]:
        return {"host_cache_blocks": len(self._entries), "host_cache_total_blocks": self.num_blocks,
                "num_host_cache_stores": self.num_stores, "num_host_cache_evictions": self.num_evictions,
                "num_host_cache_dropped": self.num_dropped, "host_cache_hit_blocks": self.num_hit_blocks}


# The most bytes of one host run (nexus_jax.core.host_runs): 32 blocks of the 8B shape. Each array moved costs ~0.1 ms
# beside its bytes (H100 host, RESULTS.md), under a tenth of a 64 MiB copy's time.
RUN_BYTES = 64 * 2**20


def host_memory(config: Any, executor: Any) -> tuple[SwapSpace | None, HostCache | None]:
    """Books the executor's host memory: swap_space_gib for swap preemption (in swap mode), then host_cache_gib
    for the host tier (when positive), one host block array shared by both; the host tier's blocks in runs."""
    swap_blocks = host_blocks = 0
    if config.preemption_mode == "swap":
        swap_blocks = _blocks("swap_space_gib", config.swap_space_gib, executor.block_bytes)
    if config.host_cache_gib > 0:
        host_blocks = _blocks("host_cache_gib", config.host_cache_gib, executor.block_bytes)
    run = run_blocks(executor.block_bytes, executor.num_blocks)
    if swap_blocks + host_blocks:
        executor.allocate_swap_space(swap_blocks + host_blocks, run_from=swap_blocks, run=run)
    return (SwapSpace(swap_blocks) if swap_blocks else None,
            HostCache(host_blocks, first_block=swap_blocks, run=run) if host_blocks else None)


def run_blocks(block_bytes: int, device_blocks: int) -> int:
    """Blocks per host run: a power of two up to RUN_BYTES and to a quarter of the device pool (a plan evicts at
    most the pool, so a larger run would never be written whole)."""
    run = 1
    while run < 32 and 2 * run * block_bytes <= RUN_BYTES and 2 * run <= device_blocks // 4:
        run *= 2
    return run


def _blocks(name: str, gib: float, block_bytes: int) -> int:
    num_blocks = int(gib * 2**30) // block_bytes
    if num_blocks < 1:
        raise ValueError(f"{name} {gib} holds no KV block ({block_bytes} bytes each)")
    return num_blocks
