"""Tests for nexus_jax/core/block_manager.py: accounting, atomic failure, prefix cache, LRU eviction, fork, named
errors, no scans of the pool (test_block_manager_reference.py runs random workloads against a reference model)."""

import random
import time

import pytest

from nexus_jax.core.block_manager import BlockManager


def random_tokens(rng, n, vocab=1000):
    return [rng.randrange(vocab) for _ in range(n)]


def computed_seq(bm, seq_id, tokens, prefix=()):
    """Allocates and commits a whole sequence, as an engine would after running it."""
    table = bm.allocate(seq_id, len(tokens), prefix)
    assert table is not None
    bm.commit(seq_id, tokens, len(tokens))
    return table


def test_allocate_and_free_accounting():
    bm = BlockManager(10, 4)
    assert (bm.num_free_blocks, bm.usage) == (10, 0.0)
    table = bm.allocate("a", 9)
    assert len(table) == 3 and len(set(table)) == 3
    assert (bm.num_free_blocks, bm.usage) == (7, pytest.approx(0.3))
    assert bm.allocate("a", 12) == table  # still covered
    grown = bm.allocate("a", 13)
    assert grown[:3] == table and len(grown) == 4 and grown[3] not in table
    other = bm.allocate("b", 1)
    assert len(other) == 1 and other[0] not in grown
    grown.append(99)  # the returned table is a copy
    assert bm.block_table("a") == grown[:4]
    bm.free("a")
    bm.free("b")
    assert (bm.num_free_blocks, bm.usage) == (10, 0.0)
    assert bm.allocate("c", 0) == []


def test_allocation_failure_changes_nothing():
    rng = random.Random(0)
    bm = BlockManager(5, 4)
    cached = random_tokens(rng, 8)
    computed_seq(bm, "old", cached)
    bm.free("old")  # two evictable cached blocks
    table = bm.allocate("a", 12)
    assert bm.num_free_blocks == 2
    assert bm.allocate("b", 12) is None
    assert bm.allocate("a", 24) is None
    prefix = bm.match_prefix(cached + [1])
    assert len(prefix) == 2
    # Reviving both cached blocks leaves nothing for the third block this sequence needs.
    assert bm.allocate("c", 9, prefix) is None
    assert bm.num_free_blocks == 2 and bm.block_table("a") == table
    assert bm.match_prefix(cached + [1]) == prefix
    for seq_id in ("b", "c"):
        with pytest.raises(KeyError, match="unknown sequence"):
            bm.block_table(seq_id)
    assert bm.allocate("c", 8, prefix) == prefix
    assert bm.num_free_blocks == 0


def test_prefix_reused_after_commit_and_after_free():
    rng = random.Random(1)
    bm = BlockManager(16, 4)
    prompt = random_tokens(rng, 10)
    table = computed_seq(bm, "a", prompt)
    other = prompt[:8] + random_tokens(rng, 5)
    assert bm.match_prefix(other) == table[:2]  # a is still running
    assert bm.match_prefix(prompt[:7] + [prompt[7] + 1] + prompt[8:]) == table[:1]
    bm.free("a")
    assert bm.num_free_blocks == 16
    prefix = bm.match_prefix(other)
    assert prefix == table[:2]
    reused = bm.allocate("b", len(other), prefix)
    assert reused[:2] == table[:2] and len(reused) == 4
    assert bm.num_free_blocks == 12
    assert bm.stats()["prefix_hits"] == 3 and bm.stats()["prefix_queries"] == 3


def test_at_least_one_token_is_left_to_compute():
    rng = random.Random(2)
    bm = BlockManager(8, 4)
    prompt = random_tokens(rng, 8)
    table = computed_seq(bm, "a", prompt)
    assert bm.match_prefix(prompt) == table[:1]
    assert bm.match_prefix(prompt + [5]) == table
    assert bm.match_prefix(prompt[:4]) == []
    assert bm.match_prefix([]) == []


def test_lru_evicts_oldest_released_first():
    rng = random.Random(3)
    bm = BlockManager(6, 2)
    a, b = random_tokens(rng, 4), random_tokens(rng, 4)
    table_a, table_b = computed_seq(bm, "a", a), computed_seq(bm, "b", b)
    bm.free("a")
    bm.free("b")  # released in order: a's tail, a's head, b's tail, b's head
    bm.allocate("c", 4)  # the two never-cached blocks go before any cached one
    assert bm.match_prefix(a + [0]) == table_a and bm.match_prefix(b + [0]) == table_b
    assert bm.allocate("c", 6)[2] == table_a[1]
    assert bm.match_prefix(a + [0]) == table_a[:1] and bm.match_prefix(b + [0]) == table_b
    assert bm.allocate("c", 10)[3:] == [table_a[0], table_b[1]]
    assert bm.match_prefix(a + [0]) == [] and bm.match_prefix(b + [0]) == table_b[:1]
    assert bm.stats()["num_cached"] == 1


def test_shared_prefix_outlives_tails():
    rng = random.Random(4)
    bm = BlockManager(5, 2)
    head = random_tokens(rng, 2)
    x, y = head + random_tokens(rng, 2), head + random_tokens(rng, 2)
    table_x = computed_seq(bm, "x", x)
    table_y = computed_seq(bm, "y", y, bm.match_prefix(y))
    assert table_y[0] == table_x[0] and table_y[1] != table_x[1]
    bm.free("x")  # released first, but its head is still held by y
    bm.free("y")
    bm.allocate("z", 4)  # the two never-cached blocks
    evicted = [bm.allocate("z", 2 * n)[-1] for n in (3, 4, 5)]
    assert evicted == [table_x[1], table_y[1], table_x[0]]


def test_refcounts_of_shared_blocks():
    rng = random.Random(5)
    bm = BlockManager(6, 4)
    prompt = random_tokens(rng, 9)
    table_a = computed_seq(bm, "a", prompt)
    table_b = bm.allocate("b", 9, bm.match_prefix(prompt))
    assert table_b[:2] == table_a[:2] and table_b[2] != table_a[2]
    assert bm._ref_counts[table_a[0]] == 2 and bm.num_free_blocks == 2
    bm.free("a")
    assert bm.num_free_blocks == 3  # only a's own tail came back
    assert bm.match_prefix(prompt) == table_a[:2]
    table_c = bm.allocate("c", 12)
    assert not set(table_c) & set(table_b)
    assert bm.allocate("d", 1) is None


def test_same_block_under_another_prefix_is_not_matched():
    rng = random.Random(6)
    bm = BlockManager(8, 4)
    first, second, shared = random_tokens(rng, 4), random_tokens(rng, 4), random_tokens(rng, 4)
    table = computed_seq(bm, "a", first + shared)
    assert bm.match_prefix(second + shared + [1]) == []
    assert bm.match_prefix(shared + shared + [1]) == []
    assert bm.match_prefix(first + shared + [1]) == table


def test_identical_blocks_computed_twice_keep_the_first_mapping():
    rng = random.Random(7)
    bm = BlockManager(8, 4)
    prompt = random_tokens(rng, 8)
    table_a = bm.allocate("a", 8)
    bm.allocate("b", 8)
    bm.commit("a", prompt, 8)
    bm.commit("b", prompt, 8)
    assert bm.match_prefix(prompt + [0]) == table_a
    bm.free("b")
    bm.free("a")
    assert bm.stats()["num_cached"] == 2 and bm.stats()["num_evictable"] == 2
    assert bm.match_prefix(prompt + [0]) == table_a


def test_fork_shares_full_blocks_only():
    rng = random.Random(8)
    bm = BlockManager(8, 4)
    prompt = random_tokens(rng, 10)
    parent = computed_seq(bm, "p", prompt)
    child = bm.fork("p", "c", 10)
    assert child == parent[:2] and bm.block_table("c") == parent[:2]
    assert [bm._ref_counts[b] for b in parent] == [2, 2, 1]
    assert bm.fork("p", "c0", 3) == []
    grown = bm.allocate("c", 12)
    assert grown[:2] == parent[:2] and grown[2] not in parent
    bm.free("p")
    assert bm.num_free_blocks == 5
    bm.commit("c", prompt[:8] + [7, 7, 7, 7], 12)
    assert bm.match_prefix(prompt[:8] + [7, 7, 7, 7, 0]) == grown
    with pytest.raises(ValueError, match="already allocated"):
        bm.fork("c", "c0", 4)
    with pytest.raises(ValueError, match="outside"):
        bm.fork("c", "c1", 13)
    with pytest.raises(KeyError, match="unknown sequence"):
        bm.fork("p", "c2", 4)


def test_reset_prefix_cache_forgets_released_blocks_only():
    rng = random.Random(9)
    bm = BlockManager(8, 4)
    gone, kept = random_tokens(rng, 8), random_tokens(rng, 8)
    computed_seq(bm, "gone", gone)
    table = computed_seq(bm, "kept", kept)
    bm.free("gone")
    bm.reset_prefix_cache()
    assert bm.match_prefix(gone + [0]) == []
    assert bm.match_prefix(kept + [0]) == table
    assert bm.num_free_blocks == 6 and bm.stats()["num_evictable"] == 0 and bm.stats()["num_cached"] == 2


def test_prefix_caching_disabled():
    rng = random.Random(10)
    bm = BlockManager(4, 4, enable_prefix_caching=False)
    prompt = random_tokens(rng, 9)
    computed_seq(bm, "a", prompt)
    assert bm.match_prefix(prompt) == []
    bm.free("a")
    assert bm.match_prefix(prompt) == [] and bm.stats()["num_cached"] == 0
    assert bm.num_free_blocks == 4


def test_bad_input_is_named():
    rng = random.Random(11)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
    bm = BlockManager(8, 4)
    prompt = random_tokens(rng, 8)
    table = computed_seq(bm, "a", prompt)
    with pytest.raises(ValueError, match="non-negative"):
        bm.allocate("b", -1)
    with pytest.raises(ValueError, match="outside"):
        bm.allocate("b", 8, [8])
    with pytest.raises(ValueError, match="no cached prefix"):
        bm.allocate("b", 8, [5])
    with pytest.raises(ValueError, match="chain"):
        bm.allocate("b", 8, table[1:])
    with pytest.raises(ValueError, match="chain"):
        bm.allocate("b", 8, table[::-1])
    with pytest.raises(ValueError, match="already allocated"):
        bm.allocate("a", 12, table[:1])
    with pytest.raises(ValueError, match="num_computed"):
        bm.commit("a", prompt, 9)
    with pytest.raises(ValueError, match="num_computed"):
        bm.commit("a", prompt + prompt, 9)
    for call in (lambda: bm.free("b"), lambda: bm.commit("b", prompt, 1), lambda: bm.block_table("b")):
        with pytest.raises(KeyError, match="unknown sequence"):
            call()
    assert bm.num_free_blocks == 6 and bm.block_table("a") == table


def test_calls_do_not_scan_a_large_pool():
    # A per-call scan of 200k blocks would take minutes here; block-local work takes well under a second.
    rng = random.Random(12)
    bm = BlockManager(200_000, 16)
    start = time.perf_counter()
    for i in range(2000):
        prompt = random_tokens(rng, 40, vocab=4)
        table = bm.allocate(i, len(prompt), bm.match_prefix(prompt))
        bm.commit(i, prompt, len(prompt))
        bm.fork(i, ("child", i), len(prompt))
        assert table is not None
        if i % 2:
            bm.free(i)
            bm.free(("child", i))
    assert time.perf_counter() - start < 5.0
