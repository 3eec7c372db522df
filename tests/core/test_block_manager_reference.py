"""nexus_jax/core/block_manager.py under a seeded random workload, checked step by step against a reference model
built from token tuples and pool scans (test_block_manager.py has the hand-made cases)."""

import random
from collections import Counter

import pytest

from nexus_jax.core.block_manager import BlockManager


class ReferenceModel:
    """What the manager should do, with keys as token tuples from the sequence start and state found by scanning.

    `written` is what the pool physically holds in each block (the tokens from the sequence start through it, since
    K/V depends on the whole prefix), written by the simulated engine; None is garbage from a new owner."""

    def __init__(self, num_blocks, block_size, caching):
        self.num_blocks, self.size, self.caching = num_blocks, block_size, caching
        self.tables, self.tokens, self.computed, self.committed = {}, {}, {}, {}
        self.key_of, self.block_of = {}, {}
        self.released = []  # keyed blocks nobody holds, least recently released first
        self.written = [None] * num_blocks

    def ref_counts(self):
        return Counter(b for table in self.tables.values() for b in table)

    def num_free(self):
        return self.num_blocks - len(self.ref_counts())

    def match(self, tokens):
        blocks = []
        for i in range((len(tokens) - 1) // self.size if self.caching else 0):
            block = self.block_of.get(tuple(tokens[:(i + 1) * self.size]))
            if block is None:
                break
            blocks.append(block)
        return blocks

    def allocate(self, seq_id, num_tokens, prefix, result):
        """Checks the manager's `result` (table or None) and follows the blocks it chose."""
        table = self.tables.get(seq_id, list(prefix))
        counts = self.ref_counts()
        need = max(0, -(-num_tokens // self.size) - len(table))
        if result is None:
            assert need > self.num_free() - sum(counts[b] == 0 for b in prefix)
            return
        assert result[:len(table)] == table and len(result) == len(table) + need
        for block in prefix:
            if block in self.released:
                self.released.remove(block)
        for block in result[len(table):]:
            assert counts[block] == 0, f"block {block} handed out while held"
            counts[block] = 1
            never_keyed = [b for b in range(self.num_blocks) if counts[b] == 0 and b not in self.key_of]
            if never_keyed or block not in self.key_of:
                assert block not in self.key_of, "evicted a cached block while never-cached ones were free"
            else:
                assert block == self.released.pop(0), "evicted a cached block other than the least recent"
                del self.block_of[self.key_of.pop(block)]
            self.written[block] = None
        self.tables[seq_id] = result

    def compute(self, seq_id, num_computed):
        """The engine writes the K/V of tokens computed[seq_id]..num_computed, then commits them."""
        table, tokens = self.tables[seq_id], self.tokens[seq_id]
        for i in range(self.computed[seq_id] // self.size, -(-num_computed // self.size)):
            self.written[table[i]] = tuple(tokens[:min((i + 1) * self.size, num_computed)])
        self.computed[seq_id] = num_computed
        for i in range(self.committed[seq_id], num_computed // self.size if self.caching else 0):
            key = tuple(tokens[:(i + 1) * self.size])
            if key not in self.block_of and table[i] not in self.key_of:
                self.block_of[key], self.key_of[table[i]] = table[i], key
        self.committed[seq_id] = max(self.committed[seq_id], num_computed // self.size)

    def free(self, seq_id):
        table = self.tables.pop(seq_id)
        counts = self.ref_counts()
        self.released += [b for b in reversed(table) if counts[b] == 0 and b in self.key_of]

    def reset(self):
        for block in self.released:
            del self.block_of[self.key_of.pop(block)]
        self.released = []

    def check(self, bm):
        counts = self.ref_counts()
        assert {s: bm.block_table(s) for s in self.tables} == self.tables
        assert [bm._ref_counts[b] for b in range(self.num_blocks)] == [counts[b] for b in range(self.num_blocks)]
        assert bm.num_free_blocks + len(counts) == self.num_blocks
        assert bm.usage == pytest.approx(len(counts) / self.num_blocks)
        assert list(bm._evictable) == self.released
        assert bm.stats()["num_cached"] == len(self.block_of)
        for key, block in self.block_of.items():
            assert self.written[block] == key, f"block {block} is cached as a prefix it does not hold"


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_random_workload_against_reference(seed, caching):
    rng = random.Random(seed)
    size = rng.choice([1, 2, 4])
    bm, model = BlockManager(24, size, caching), ReferenceModel(24, size, caching)
    bases = [[rng.randrange(3) for _ in range(24)] for _ in range(3)]

    def query():
        return rng.choice(bases)[:rng.randrange(25)] + [rng.randrange(3) for _ in range(rng.randrange(4))]

    def matched(tokens):
        blocks = bm.match_prefix(tokens)
        assert blocks == model.match(tokens)
        assert len(blocks) * size < len(tokens) or not tokens
        for i, block in enumerate(blocks):
            assert model.written[block] == tuple(tokens[:(i + 1) * size])
        return blocks

    def step(seq_id, first_prefix=None):
        tokens, done = model.tokens[seq_id], model.computed[seq_id]
        if done == len(tokens):
            tokens.append(rng.randrange(3))  # decode
        target = min(done + rng.randint(1, 6), len(tokens))
        result = bm.allocate(seq_id, target, first_prefix or ())
        model.allocate(seq_id, target, first_prefix or (), result)
        if result is not None:
            model.compute(seq_id, target)
            bm.commit(seq_id, tokens, target)
        return result

    next_id = 0
    for _ in range(1500):
        live = sorted(model.tables)
        op = rng.random()
        if op < 0.25 or not live:
            tokens = query() or [0]
            prefix = matched(tokens)
            prefix = prefix[:rng.randint(0, len(prefix))] if rng.random() < 0.3 else prefix
            model.tokens[next_id], model.computed[next_id] = tokens, len(prefix) * size
            model.committed[next_id] = len(prefix)
            if step(next_id, prefix) is None:
                for state in (model.tokens, model.computed, model.committed):
                    del state[next_id]
            next_id += 1
        elif op < 0.65:
            seq_id = rng.choice(live)
            if len(model.tokens[seq_id]) < 48:
                step(seq_id)
        elif op < 0.82:
            seq_id = rng.choice(live)
            bm.free(seq_id)
            model.free(seq_id)
        elif op < 0.9:
            parent = rng.choice(live)
            num_tokens = rng.randint(0, model.computed[parent])
            table = bm.fork(parent, next_id, num_tokens)
            model.tables[next_id] = model.tables[parent][:num_tokens // size]
            assert table == model.tables[next_id]
            model.tokens[next_id] = model.tokens[parent][:num_tokens]
            model.computed[next_id] = num_tokens // size * size
            model.committed[next_id] = min(model.committed[parent], num_tokens // size)
            next_id += 1
        elif op < 0.98:
            matched(query())
        else:
            bm.reset_prefix_cache()
            model.reset()
        model.check(bm)
    assert next_id > 300
