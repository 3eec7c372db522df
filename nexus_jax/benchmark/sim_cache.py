"""The simulator's KV of one replica: the running calls' own K/V, the cached contexts on the device, and a host
tier that catches the contexts the device evicts (the engine's `host_cache_gib`, issue 20).

A program's cached context is one entry per tier (the longest run of its context computed here, in full blocks),
moved whole. An entry that running calls read is pinned. Eviction follows the engine's order
(`nexus_jax.core.retention`): least recently released first, or, with a rank (program-aware retention under
mlfq/plas/atlas), lowest rank first and least recent within a rank. Evicted from the device, an entry goes to the
host tier when one is configured and it fits there (the host making room in the same order), else it is gone; a
later call of its program restores it (one copy, charged to the step that admits the call beyond what the step
before it covers) and it leaves the host tier.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Hashable

Rank = Callable[[Hashable], tuple]  # higher: kept longer (ProgramPolicy.retention)


@dataclasses.dataclass(eq=False)
class Cached:
    context: int
    tokens: int
    readers: int = 0       # running calls reading it: not evictable
    stamp: int = 0         # when it was last released or restored (recency)


class Tier:
    """Cached contexts by program id, within a capacity in tokens."""

    def __init__(self, capacity: int, rank: Rank | None):
        self.capacity = capacity
        self.rank = rank
        self.entries: dict[str, Cached] = {}
        self.tokens = 0

    def add(self, pid: str, entry: Cached) -> None:
        self.drop(pid)
        self.entries[pid] = entry
        self.tokens += entry.tokens

    def drop(self, pid: str) -> Cached | None:
        entry = self.entries.pop(pid, None)
        if entry is not None:
            self.tokens -= entry.tokens
        return entry

    def victims(self, keep: str | None) -> list[str]:
        """Evictable entries, first to go first."""
        pids = [p for p, e in self.entries.items() if e.readers == 0 and p != keep]
        if self.rank is None:
            return sorted(pids, key=lambda p: self.entries[p].stamp)
        return sorted(pids, key=lambda p: (self.rank(p), self.entries[p].stamp))


class ReplicaKv:
    def __init__(self, capacity: int, host_capacity: int, block_size: int, rank: Rank | None = None):
        self.capacity = capacity
        self.block_size = block_size
        self.device = Tier(capacity, rank)
        self.host = Tier(host_capacity, rank)
        self.own = 0  # K/V of the running calls beyond what they read from the cache
        self._clock = itertools.count()

    @property
    def cached_tokens(self) -> int:
        return self.device.tokens

    def lookup(self, pid: str, context: int, limit: int) -> tuple[int, int]:
        """(tokens read on the device, tokens to restore from the host) of a prompt that shares `limit` leading
        tokens with its program's context: whole blocks. At most one of the two is nonzero."""
        for tier, i in ((self.device, 0), (self.host, 1)):
            entry = tier.entries.get(pid)
            if entry is not None and entry.context == context:
                hit = min(entry.tokens, limit) // self.block_size * self.block_size
                return (hit, 0) if i == 0 else (0, hit)
        return 0, 0

    def room(self, n: int, keep: str | None) -> bool:
        """Whether n more tokens fit on the device, evicting unread cached contexts (never `keep`'s, in either
        tier) to make room."""
        over = self.device.tokens + self.own + n - self.capacity
        if over <= 0:
            return True
        for pid in self.device.victims(keep):
            entry = self.device.drop(pid)
            over -= entry.tokens
            self._offload(pid, entry, keep)
            if over <= 0:
                break
        return over <= 0

    def restore(self, pid: str, tokens: int) -> None:
        """Moves the first `tokens` of the program's host entry to the device (room was made by the caller)."""
        entry = self.host.drop(pid)
        self.device.add(pid, Cached(entry.context, tokens, stamp=next(self._clock)))

    def read(self, pid: str) -> None:
        self.device.entries[pid].readers += 1

    def release(self, pid: str, context: int, tokens: int, read: bool) -> None:
        """A call of the program leaves the running set with `tokens` computed full blocks: they stay cached as
        its program's context (`read`: it was reading the device entry)."""
        entry = self.device.entries.get(pid)
        if read:
            entry.readers -= 1
        if entry is None or entry.context != context:
            self.device.drop(pid)
            entry = Cached(context, 0)
            self.device.add(pid, entry)
        self.host.drop(pid)  # the device's entry is the program's newest
        entry.stamp = next(self._clock)
        grow = max(tokens - entry.tokens, 0)
        entry.tokens += grow
        self.device.tokens += grow

    def _offload(self, pid: str, entry: Cached, keep: str | None) -> None:
        host = self.host
        if entry.tokens == 0 or entry.tokens > host.capacity:
            return
        over = host.tokens + entry.tokens - host.capacity
        for victim in host.victims(keep) if over > 0 else ():
            over -= host.drop(victim).tokens
            if over <= 0:
                break
        if over <= 0:
            entry.readers = 0
            host.add(pid, entry)
