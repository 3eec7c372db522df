"""Host-side bookkeeping of the paged KV pool: the block table of each sequence, and a prefix cache of full blocks.

A full block whose K/V is in the pool is named by a chained key (its parent block's key and its own token ids), so
sequences with a common prefix share the blocks that hold it. A block released by its last sequence keeps its K/V and
its key until the pool needs it for something else, least recently released first (or, under a program-aware
policy, by its program's rank: nexus_jax.core.retention); with a host tier (nexus_jax.core.host_cache) an evicted
block's K/V moves to host memory. Every call costs O(blocks it touches); nothing scans the pool, which can hold
~100k blocks and is consulted every step.

A request with a cache salt (vLLM's `cache_salt`, CVE-2025-46570) chains its keys from a root of its salt instead of
the common one, so it shares cached blocks only with requests of the same salt: another tenant cannot tell from the
time to first token whether a prompt of its choosing is cached.
"""

from __future__ import annotations

import array
import hashlib
from typing import TYPE_CHECKING, Hashable, Sequence

from nexus_jax.core.retention import EvictionOrder, Rank

if TYPE_CHECKING:
    from nexus_jax.core.host_cache import HostCache

_ROOT = b""  # parent key of a sequence's first block, when the request has no cache salt


def prefix_root(salt: str | None) -> bytes:
    """Parent key of the first block of a sequence whose request has cache salt `salt` (None: no salt)."""
    if salt is None:
        return _ROOT
    return hashlib.blake2b(salt.encode(), digest_size=16, person=b"nexus-cache-salt").digest()


def block_key(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Key of one full block: collision resistant, so equal keys mean equal token ids from the sequence start."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(array.array("i", token_ids).tobytes())  # int32
    return digest.digest()


class BlockManager:
    """Allocates KV blocks to sequences, shares cached prefix blocks between them and evicts cached blocks LRU."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        # Free blocks without a key, popped from the end so that low ids go first; these are used before any cached
        # block is evicted.
        self._free = list(range(num_blocks - 1, -1, -1))
        # Blocks with a key that no sequence holds, by the program that released them (nexus_jax.core.retention).
        self._evictable = EvictionOrder()
        self._owners: dict[Hashable, Hashable] = {}  # the program of each sequence that has one
        self._key_of: list[bytes | None] = [None] * num_blocks
        self._parent_of: list[bytes | None] = [None] * num_blocks  # lets allocate check that prefix_blocks chain
        self._block_of: dict[bytes, int] = {}
        self._tables: dict[Hashable, list[int]] = {}
        self._keys: dict[Hashable, list[bytes]] = {}  # chained keys of each sequence's committed full blocks
        self._roots: dict[Hashable, bytes] = {}  # the root keys of salted sequences (others chain from _ROOT)
        self._queries = self._hits = self._query_tokens = self._hit_tokens = 0
        self.host: HostCache | None = None  # where evicted cached blocks go; None: they are lost

    @property
    def num_free_blocks(self) -> int:
        """Blocks that allocate can hand out now: never-cached free blocks plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by live sequences."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def match_prefix(self, token_ids: Sequence[int], salt: str | None = None) -> list[int]:
        """Blocks holding the longest cached prefix of full blocks of `token_ids`, leaving at least one token out
        (the model must run the last prompt token to get its logits), cached by requests of cache salt `salt`.
        Takes no references."""
        self._queries += 1
        self._query_tokens += len(token_ids)
        if not self.enable_prefix_caching:
            return []
        size = self.block_size
        blocks: list[int] = []
        parent = prefix_root(salt)
        for i in range((len(token_ids) - 1) // size):
            key = block_key(parent, token_ids[i * size:(i + 1) * size])
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
            parent = key
        if blocks:
            self._hits += 1
            self._hit_tokens += len(blocks) * size
        return blocks

    def match_host(self, token_ids: Sequence[int], prefix: Sequence[int], salt: str | None = None) -> list[bytes]:
        """Keys of the blocks of the host tier that continue `prefix` (what match_prefix returned for `token_ids`
        and `salt`), up to the first miss, leaving the last token out as match_prefix does."""
        if self.host is None:
            return []
        size = self.block_size
        keys: list[bytes] = []
        parent = self._key_of[prefix[-1]] if prefix else prefix_root(salt)
        for i in range(len(prefix), (len(token_ids) - 1) // size):
            key = block_key(parent, token_ids[i * size:(i + 1) * size])
            if not self.host.readable(key):
                break
            keys.append(key)
            parent = key
        return keys

    def set_retention(self, rank: Rank | None) -> None:
        """Ranks the cached blocks no sequence holds, in the pool and the host tier, by the program that released
        them (None: plain LRU)."""
        self._evictable.set_rank(rank)
        if self.host is not None:
            self.host.order.set_rank(rank)

    def rerank(self) -> None:
        """The programs' ranks changed: the next eviction, in the pool or the host tier, ranks them again."""
        self._evictable.invalidate()
        if self.host is not None:
            self.host.order.invalidate()

    def allocate(self, seq_id: Hashable, num_tokens: int, prefix_blocks: Sequence[int] = (),
                 salt: str | None = None, owner: Hashable = None) -> list[int] | None:
        """Grows the block table of `seq_id` to cover `num_tokens` tokens and returns a copy of it; on the first call
        `prefix_blocks` (from match_prefix with the same salt) become its head, `salt`, its request's cache salt,
        keys the blocks it commits, and `owner` (its program) owns its blocks once released. Returns None,
        changing nothing, when the pool is short."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be non-negative, got {num_tokens}")
        table = self._tables.get(seq_id)
        if table is not None and len(prefix_blocks):
            raise ValueError(f"sequence {seq_id!r} is already allocated; prefix_blocks are only taken on its first "
                             f"call")
        root = prefix_root(salt)
        if table is None:
            self._check_prefix(prefix_blocks, root)
        held = len(prefix_blocks) if table is None else len(table)
        need = max(0, -(-num_tokens // self.block_size) - held)
        # Prefix blocks nobody holds are counted as free now but stop being so once taken.
        revived = sum(1 for block in prefix_blocks if self._ref_counts[block] == 0)
        if need > self.num_free_blocks - revived:
            return None
        if table is None:
            for block in prefix_blocks:
                if self._ref_counts[block] == 0:
                    self._evictable.remove(block)
                self._ref_counts[block] += 1
            table = self._tables[seq_id] = list(prefix_blocks)
            self._keys[seq_id] = [self._key_of[block] for block in prefix_blocks]
            if root != _ROOT:
                self._roots[seq_id] = root
            if owner is not None:
                self._owners[seq_id] = owner
        for _ in range(need):
            table.append(self._take_free_block())
        return list(table)

    def commit(self, seq_id: Hashable, token_ids: Sequence[int], num_computed: int) -> None:
        """Records that the first `num_computed` tokens of `token_ids` (the sequence so far) have K/V in the pool, so
        that its newly full blocks become matchable. A block whose key is already cached elsewhere stays unkeyed."""
        table = self._table(seq_id)
        if not 0 <= num_computed <= len(token_ids):
            raise ValueError(f"num_computed {num_computed} is outside 0..{len(token_ids)} (len(token_ids))")
        if num_computed > len(table) * self.block_size:
            raise ValueError(f"num_computed {num_computed} exceeds the {len(table)} blocks of sequence {seq_id!r}")
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        keys = self._keys[seq_id]
        root = self._roots.get(seq_id, _ROOT)
        for i in range(len(keys), num_computed // size):
            key = block_key(keys[-1] if keys else root, token_ids[i * size:(i + 1) * size])
            block = table[i]
            # A forked child may commit a shared block its parent already keyed.
            if key not in self._block_of and self._key_of[block] is None:
                self._block_of[key] = block
                self._key_of[block] = key
                self._parent_of[block] = keys[-1] if keys else root
            keys.append(key)

    def free(self, seq_id: Hashable) -> None:
        """Drops the references of `seq_id`. Its blocks are released tail first, so when cached they are evicted
        before its prefix blocks, which other prompts are likelier to share."""
        table = self._table(seq_id)
        del self._tables[seq_id], self._keys[seq_id]
        self._roots.pop(seq_id, None)
        owner = self._owners.pop(seq_id, None)
        for block in reversed(table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if self._key_of[block] is None:
                    self._free.append(block)
                else:
                    self._evictable.add(block, owner)

    def holds(self, seq_id: Hashable) -> bool:
        """Whether seq_id has a block table (allocated and not freed)."""
        return seq_id in self._tables

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._table(seq_id))

    def fork(self, parent_id: Hashable, child_id: Hashable, num_tokens: int) -> list[int]:
        """Starts `child_id` sharing the full blocks of `parent_id` that cover its first `num_tokens` tokens. The
        partial last block is not shared: the caller recomputes those tokens into blocks the child allocates."""
        parent = self._table(parent_id)
        if child_id in self._tables:
            raise ValueError(f"fork target {child_id!r} is already allocated")
        if not 0 <= num_tokens <= len(parent) * self.block_size:
            raise ValueError(f"num_tokens {num_tokens} is outside 0..{len(parent) * self.block_size}, "
                             f"what the {len(parent)} blocks of {parent_id!r} hold")
        shared = parent[:num_tokens // self.block_size]
        for block in shared:
            self._ref_counts[block] += 1
        self._tables[child_id] = shared
        self._keys[child_id] = self._keys[parent_id][:len(shared)]
        if parent_id in self._roots:
            self._roots[child_id] = self._roots[parent_id]
        if parent_id in self._owners:
            self._owners[child_id] = self._owners[parent_id]
        return list(shared)

    def reset_prefix_cache(self) -> None:
        """Forgets the keys of all blocks no sequence holds, and the host tier; blocks held by live sequences stay
        matchable."""
        for block in self._evictable:
            self._forget(block)
            self._free.append(block)
        self._evictable.clear()
        if self.host is not None:
            self.host.clear()

    def stats(self) -> dict:
        return {"num_free": self.num_free_blocks, "num_cached": len(self._block_of),
                "num_evictable": len(self._evictable), "prefix_queries": self._queries, "prefix_hits": self._hits,
                "prefix_query_tokens": self._query_tokens, "prefix_hit_tokens": self._hit_tokens}

    def _table(self, seq_id: Hashable) -> list[int]:
        table = self._tables.get(seq_id)
        if table is None:
            raise KeyError(f"unknown sequence {seq_id!r}")
        return table

    def _check_prefix(self, prefix_blocks: Sequence[int], parent: bytes) -> None:
        for block in prefix_blocks:
            if not 0 <= block < self.num_blocks:
                raise ValueError(f"prefix block {block} is outside 0..{self.num_blocks - 1}")
            if self._key_of[block] is None:
                raise ValueError(f"prefix block {block} holds no cached prefix")
            if self._parent_of[block] != parent:
                raise ValueError(f"prefix blocks {list(prefix_blocks)} do not chain from the sequence start; "
                                 f"pass what match_prefix returned (or a head of it)")
            parent = self._key_of[block]

    def _take_free_block(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, owner = self._evictable.pop()
            if self.host is not None:
                self.host.store(block, self._key_of[block], owner)
            self._forget(block)
        self._ref_counts[block] = 1
        return block

    def _forget(self, block: int) -> None:
        del self._block_of[self._key_of[block]]
        self._key_of[block] = None
        self._parent_of[block] = None
