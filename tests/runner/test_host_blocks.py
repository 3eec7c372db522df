"""runner/host_blocks.py: the runner's host memory for KV blocks, one pinned-host array per block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runner import programs
from runner.host_blocks import HostBlocks, pad_blocks

SHAPE = (2, 2, 5, 1, 4, 3)  # [L, 2, blocks, Hkv, block_size, D]
BLOCK_SHAPE = SHAPE[:2] + SHAPE[3:]


def pool() -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).standard_normal(SHAPE, np.float32)) + 0


def test_store_then_read_keeps_each_block_in_pinned_host_memory():
    host = HostBlocks(4, BLOCK_SHAPE, jnp.float32, jax.devices()[0])
    kv = pool()
    host.store(kv, [3, 1], [0, 2])
    np.testing.assert_array_equal(host.read([0, 2]), np.asarray(kv)[:, :, [3, 1]])
    np.testing.assert_array_equal(host.read([1]), 0)  # never written: zeros, not garbage
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    if "pinned_host" in kinds:
        assert host._blocks[0].sharding.memory_kind == "pinned_host"
    assert sum(b is not None for b in host._blocks) == 2  # exactly the blocks written: memory follows the count


def test_a_later_copy_to_the_same_host_block_wins_and_load_pads_to_the_bucket():
    host = HostBlocks(3, BLOCK_SHAPE, jnp.float32, jax.devices()[0])
    kv = pool()
    host.store(kv, [0, 4], [1, 1])
    loaded = host.load([1])
    assert len(loaded) == len(pad_blocks([1], 0)) == programs.MIN_SWAP_BLOCKS
    np.testing.assert_array_equal(np.asarray(loaded[0]), np.asarray(kv)[:, :, 4])
    np.testing.assert_array_equal(np.asarray(loaded[1]), 0)
    assert all(a.sharding.memory_kind == "device" for a in loaded)


@pytest.mark.parametrize("ids", [[4], [-1]])
def test_host_block_outside_the_memory_is_refused(ids):
    host = HostBlocks(4, BLOCK_SHAPE, jnp.float32, jax.devices()[0])
    with pytest.raises(ValueError, match="outside 0..3"):
        host.store(pool(), [0], ids)
    with pytest.raises(ValueError, match="outside 0..3"):
        host.load(ids)


def test_copies_into_the_pool_leave_its_programs_compiled():
    """jit compiles apart for committed and uncommitted arguments, and copy-ins are committed arrays: a pool made
    uncommitted became committed at its first copy-in, and every copy bucket compiled again mid-serving."""
    from runner.model.checkpoint import random_params
    from runner.model.config import ModelConfig
    from runner.model_runner import ModelRunner

    config = ModelConfig.preset("tiny")
    runner = ModelRunner(config, random_params(config), num_blocks=16, block_size=16)  # no device given
    runner.allocate_swap_space(8)
    runner.swap_blocks([(0, 0)], [])
    compiled = programs.split_blocks._cache_size()
    runner.swap_blocks([], [(0, 1)])  # a copy-in
    runner.swap_blocks([(1, 1)], [])  # the same bucket's copy-out again
    assert programs.split_blocks._cache_size() == compiled, "the copy-in changed the pool's placement"
    assert runner.kv_pool.committed
