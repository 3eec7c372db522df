"""The grouped GEMM (pallas_kernels.grouped_matmul) in interpret mode against jax.lax.ragged_dot, its reference,
and against a per-row numpy oracle; plus the tile schedule it runs on. CPU only."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.grouped_matmul import Tiling, _grouped_pallas, block_rows_for, grouped_matmul, tile_schedule


def oracle(lhs, rhs, sizes):
    """Row m times the matrix of the group that owns it (groups own consecutive rows); rows past them are zero."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    owner = np.repeat(np.arange(len(sizes)), sizes)[:lhs.shape[0]]
    for m, g in enumerate(owner):
        out[m] = lhs[m] @ rhs[g]
    return out


CASES = [  # (rows, inner, cols, group sizes): empty groups, tails of every block size, uncovered rows
    (40, 48, 80, [10, 0, 25, 3]),
    (64, 64, 128, [8, 8, 0, 16, 4, 12, 0, 16]),
    (7, 16, 16, [7, 0, 0]),
    (30, 32, 20, [5, 5, 5]),  # rows 15..29 belong to no group: zero
    (12, 24, 40, [5, 9, 4]),  # groups past the rows are clipped, as ragged_dot clips them
    (300, 40, 24, [0, 290, 10]),  # one group spans several tiles
]


@pytest.mark.parametrize("rows,inner,cols,sizes", CASES)
def test_matches_ragged_dot_and_the_oracle(rows, inner, cols, sizes):
    rng = np.random.default_rng(rows + inner + cols)
    lhs = jnp.asarray(rng.standard_normal((rows, inner)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), inner, cols)), jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    got = grouped_matmul(lhs, rhs, group_sizes, impl="interpret")
    np.testing.assert_allclose(got, jax.lax.ragged_dot(lhs, rhs, group_sizes), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, oracle(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)


def test_bf16_inputs_accumulate_in_float32():
    rng = np.random.default_rng(3)
    lhs = jnp.asarray(rng.standard_normal((48, 256)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((3, 256, 32)), jnp.bfloat16)
    sizes = jnp.asarray([20, 0, 28], jnp.int32)
    got = grouped_matmul(lhs, rhs, sizes, impl="interpret", preferred_element_type=jnp.float32)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, oracle(lhs, rhs, [20, 0, 28]), rtol=1e-4, atol=1e-3)
    assert grouped_matmul(lhs, rhs, sizes, impl="interpret").dtype == jnp.bfloat16


def test_xla_impl_is_ragged_dot():
    rng = np.random.default_rng(4)
    lhs = jnp.asarray(rng.standard_normal((10, 8)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((2, 8, 4)), jnp.float32)
    sizes = jnp.asarray([4, 6], jnp.int32)
    np.testing.assert_array_equal(grouped_matmul(lhs, rhs, sizes, impl="xla"), jax.lax.ragged_dot(lhs, rhs, sizes))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"lhs \[M, K\] and rhs \[G, K, N\]"):
        grouped_matmul(jnp.zeros((4, 8)), jnp.zeros((2, 9, 4)), jnp.zeros(2, jnp.int32), impl="xla")
    with pytest.raises(ValueError, match="one per group"):
        grouped_matmul(jnp.zeros((4, 8)), jnp.zeros((2, 8, 4)), jnp.zeros(3, jnp.int32), impl="xla")


def test_tiles_cover_each_group_once_and_never_straddle():
    sizes = np.array([0, 37, 5, 0, 64, 1])
    block = 16
    group, first, end = (np.asarray(a) for a in tile_schedule(jnp.asarray(sizes), 107, block))
    assert len(group) == -(-107 // block) + len(sizes)  # the static bound that sizes the grid
    covered = np.zeros(107, int)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for g, f, e in zip(group, first, end):
        if f >= e:
            continue
        rows = np.arange(f, min(f + block, e))
        assert starts[g] <= rows[0] and rows[-1] < starts[g] + sizes[g]  # inside its own group
        covered[rows] += 1
    assert (covered == 1).all()


def test_block_rows_follow_the_average_group():
    assert block_rows_for(512, 128) == 16      # decode: 64 tokens x top 8 over 128 experts
    assert block_rows_for(65536, 128) == 128   # prefill: capped
    assert block_rows_for(3, 8) == 16          # never below Triton's minimum


@pytest.mark.parametrize("tiling", [Tiling(rows=16, cols=16, inner=16, stages=1, warps=4),
                                    Tiling(rows=32, cols=64, inner=32), Tiling(cols=256, inner=128)])
def test_every_tiling_computes_the_same_product(tiling):
    rows, inner, cols, sizes = 300, 40, 24, [0, 290, 10]
    rng = np.random.default_rng(5)
    lhs = jnp.asarray(rng.standard_normal((rows, inner)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), inner, cols)), jnp.float32)
    got = grouped_matmul(lhs, rhs, jnp.asarray(sizes, jnp.int32), impl="interpret", tiling=tiling)
    np.testing.assert_allclose(got, oracle(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)


def test_bad_tilings_are_refused():
    with pytest.raises(ValueError, match="Tiling.cols must be a power of two >= 16"):
        Tiling(cols=48)
    with pytest.raises(ValueError, match="Tiling.rows must be a power of two >= 16"):
        Tiling(rows=8)
    with pytest.raises(ValueError, match="stages >= 1 and warps"):
        Tiling(warps=3)


@pytest.mark.parametrize("cols", [40, 512])  # a column tail (masked) and none
def test_the_gpu_path_lowers_to_one_triton_kernel_with_column_blocks_fastest(cols):
    """Lowered for CUDA without a GPU (jax.export): the kernel's GPU path, which interpret mode does not run, must
    produce Triton IR; its grid runs the column blocks on the fastest axis."""
    fn = jax.jit(lambda a, b, g: _grouped_pallas(a, b, g, out_dtype=jnp.bfloat16, interpret=False,
                                                 tiling=Tiling()))
    triton = "__gpu$xla.gpu.triton"
    exported = export.export(fn, platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])(
        jax.ShapeDtypeStruct((256, 64), jnp.bfloat16), jax.ShapeDtypeStruct((4, 64, cols), jnp.bfloat16),
        jax.ShapeDtypeStruct((4,), jnp.int32))
    text = exported.mlir_module()
    assert text.count(triton) == 1
    grid = dict(re.findall(r"grid_([xyz]) = (\d+)", text))
    tiles = 256 // block_rows_for(256, 4) + 4
    assert (int(grid["x"]), int(grid["y"])) == (-(-cols // 256), tiles)
