import pytest

from runner.kv_budget import allocator_used_bytes, kv_blocks_in_budget

GIB = 1 << 30


def test_growing_allocator_counts_its_reserved_regions():
    # Not preallocated: 15 GiB in use inside 40 GiB of regions; a pool-sized buffer needs a region of its own.
    stats = {"bytes_limit": 105 * GIB, "bytes_in_use": 15 * GIB, "pool_bytes": 40 * GIB}
    assert allocator_used_bytes(stats) == 40 * GIB


def test_preallocated_allocator_counts_bytes_in_use():
    # Preallocated: one region is the whole limit, and its free space serves the pool.
    stats = {"bytes_limit": 105 * GIB, "bytes_in_use": 15 * GIB, "pool_bytes": 105 * GIB}
    assert allocator_used_bytes(stats) == 15 * GIB
    assert allocator_used_bytes({"bytes_limit": 105 * GIB, "bytes_in_use": 15 * GIB}) == 15 * GIB


def test_budget_raises_when_nothing_fits():
    assert kv_blocks_in_budget(100 * GIB, 10 * GIB, 0.9, 1 * GIB, GIB) == 79
    with pytest.raises(ValueError, match="no device memory left for the KV pool"):
        kv_blocks_in_budget(100 * GIB, 95 * GIB, 0.9, 1 * GIB, GIB)
