"""runner/host_blocks.py: the runner's host memory for KV blocks, one pinned-host array per block or per whole run."""

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
    loaded = host.load([1], [2], 5).values
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
        host.load(ids, [0], 5)


def runs_host() -> HostBlocks:
    return HostBlocks(9, BLOCK_SHAPE, jnp.float32, jax.devices()[0], run_from=1, run=3)  # runs 1-3, 4-6; 7, 8 tail


def test_a_run_written_by_one_call_is_one_array_and_comes_back_as_one():
    host, kv = runs_host(), pool()
    host.store(kv, [4, 0, 2, 1, 3], [1, 2, 3, 4, 7])  # run 0 whole; 4 and 7 alone
    assert set(host._runs) == {0} and host._blocks[1:4] == [None] * 3
    assert sum(b is not None for b in host._blocks) == 2
    np.testing.assert_array_equal(host.read([1, 2, 3, 4, 7]), np.asarray(kv)[:, :, [4, 0, 2, 1, 3]])
    copy = host.load([3, 1, 4], [0, 1, 2], 5)  # two blocks of the run (one array) and a single
    assert len(copy.run_values) == 1 and copy.runs.tolist() == [[1, 5, 0]]
    assert copy.blocks[:1].tolist() == [2] and set(copy.blocks[1:].tolist()) == {5}
    out = np.asarray(host.write(jnp.zeros(SHAPE, jnp.float32) + 0, copy))
    np.testing.assert_array_equal(out[:, :, [0, 1, 2]], np.asarray(kv)[:, :, [2, 4, 1]])
    np.testing.assert_array_equal(out[:, :, [3, 4]], 0)  # the run's unasked block went nowhere


def test_a_block_written_alone_drops_its_run_and_a_later_run_replaces_blocks():
    host, kv = runs_host(), pool()
    host.store(kv, [0, 1, 2], [4, 5, 6])
    assert set(host._runs) == {1}
    host.store(kv, [3], [5])  # the host cache reuses a whole run's block only once all of them are free
    assert host._runs == {} and sum(b is not None for b in host._blocks) == 1
    np.testing.assert_array_equal(host.read([5]), np.asarray(kv)[:, :, [3]])
    host.store(kv, [4, 3, 2], [4, 5, 6])  # whole again: the single block array goes
    assert set(host._runs) == {1} and all(b is None for b in host._blocks)
    np.testing.assert_array_equal(host.read([4, 5, 6]), np.asarray(kv)[:, :, [4, 3, 2]])


def test_the_tail_and_the_swap_space_never_form_runs():
    host, kv = runs_host(), pool()
    host.store(kv, [0, 1, 2], [0, 7, 8])
    assert host._runs == {} and host.run_of(0) is None and host.run_of(8) is None and host.run_of(6) == 1
    copy = host.load([7], [3], 5)
    assert copy.run_values == () and copy.runs.shape == (0, 3)


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


def test_the_runner_moves_whole_runs_and_warms_up_their_programs():
    from runner.model.checkpoint import random_params
    from runner.model.config import ModelConfig
    from runner.model_runner import ModelRunner

    config = ModelConfig.preset("tiny")
    runner = ModelRunner(config, random_params(config), num_blocks=16, block_size=16)
    runner.allocate_swap_space(13, run_from=4, run=4)  # swap space 0-3, runs 4-7 and 8-11, a tail block 12
    # Copies of 8, 16 blocks; of 1 and 2 whole runs (and 3 would be padded to 4, but 2 is the most there are)
    assert runner.warmup_swap(16) == 4 + 4
    before = np.asarray(runner.kv_pool)
    runner.swap_blocks([(i, 4 + i) for i in range(8)] + [(9, 12)], [])
    assert set(runner.host_blocks._runs) == {0, 1}
    np.testing.assert_array_equal(runner.host_kv[:, :, 4:13], before[:, :, [*range(8), 9]])
    runner.swap_blocks([], [(5, 15), (10, 14), (12, 13)])  # one block of each run and the tail's
    after = np.asarray(runner.kv_pool)
    np.testing.assert_array_equal(after[:, :, [15, 14, 13]], before[:, :, [1, 6, 9]])
    np.testing.assert_array_equal(after[:, :, :13], before[:, :, :13])  # the runs' other blocks went nowhere
