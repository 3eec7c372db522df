"""Grouped GEMM for mixture-of-experts layers: `jax.lax.ragged_dot` semantics as a Pallas (Triton) kernel.

lhs [M, K] holds its rows sorted by group (group g owns the next group_sizes[g] rows); rhs [G, K, N] holds one
matrix per group; row m of the output is lhs[m] @ rhs[group of m], and rows past sum(group_sizes) are zero.

Why a kernel: XLA on the GPU (jaxlib 0.11) lowers ragged_dot as if every row met every group, so an 8192-token
prefill of a 128-expert layer ran 7x slower than computing all experts densely (benchmarks/RESULTS.md, H200).

The rows are cut into tiles of `block_rows` that never straddle two groups: group g takes cdiv(size_g, block_rows)
tiles, so at most cdiv(M, block_rows) + G tiles exist, a static bound that sizes the grid. A small jnp prologue
maps each tile to (group, first row, end row); a program of the grid (column block, tile) then multiplies its rows
by its group's matrix, reading that matrix's column block once per tile. Tiles past the last group's end do nothing,
and so write nothing: the output starts as zeros (aliased in), so uncovered rows stay zero.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backend import resolve_impl
from pallas_kernels.triton_utils import compiler_params, next_pow2, plgpu

_MAX_BLOCK_ROWS = 128
_MIN_BLOCK = 16  # Triton's tensor-core dot needs at least 16 along every axis


@dataclasses.dataclass(frozen=True)
class Tiling:
    """The kernel's tile shape: `rows` per tile (None: about one group's average share, see block_rows_for),
    `cols` and `inner` (the K step) per program, Triton's software-pipelining `stages` and `warps` (None: 4 for
    tiles of up to 64 rows, else 8). Each of rows, cols and inner is a power of two of at least 16. The default
    cols, 256, was the fastest of seven tilings at 64 and 8192 tokens on the H200 (2.2x and 1.18x over 128,
    benchmarks/RESULTS.md)."""
    rows: int | None = None
    cols: int = 256
    inner: int = 64
    stages: int = 3
    warps: int | None = None

    def __post_init__(self) -> None:
        for name in ("rows", "cols", "inner"):
            v = getattr(self, name)
            if v is not None and (v < _MIN_BLOCK or v & (v - 1)):
                raise ValueError(f"Tiling.{name} must be a power of two >= {_MIN_BLOCK}, got {v}")
        if self.stages < 1 or self.warps not in (None, 1, 2, 4, 8, 16):
            raise ValueError(f"Tiling needs stages >= 1 and warps in 1, 2, 4, 8, 16; got {self.stages}, {self.warps}")


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str | None = None,
                   preferred_element_type=None, tiling: Tiling = Tiling()) -> jax.Array:
    """lhs [M, K] (rows sorted by group) times rhs [G, K, N] per group -> [M, N], as jax.lax.ragged_dot; the result
    is in preferred_element_type (default: lhs's dtype), accumulated in float32. `tiling`: the Pallas kernel's
    tile shape (benchmarks/bench_moe.py --tilings sweeps it)."""
    _check_args(lhs, rhs, group_sizes)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    impl = resolve_impl(impl)
    if impl == "xla":
        return lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=out_dtype)
    return _grouped_pallas(lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32), out_dtype=out_dtype,
                           interpret=impl == "interpret", tiling=tiling)


def _check_args(lhs, rhs, group_sizes) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3 or rhs.shape[1] != lhs.shape[1]:
        raise ValueError(f"grouped_matmul needs lhs [M, K] and rhs [G, K, N], got {lhs.shape} and {rhs.shape}")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"group_sizes must be [{rhs.shape[0]}] (one per group), got {group_sizes.shape}")


def block_rows_for(num_rows: int, num_groups: int) -> int:
    """Rows per tile: about one group's average share, so small batches (decode) pad little, within
    [16, 128]."""
    return max(_MIN_BLOCK, min(_MAX_BLOCK_ROWS, next_pow2(max(1, num_rows // max(1, num_groups)))))


def tile_schedule(group_sizes: jax.Array, num_rows: int, block_rows: int) -> tuple[jax.Array, jax.Array,
                                                                                    jax.Array]:
    """Per tile of the static bound cdiv(num_rows, block_rows) + G: (its group, its first row, the row its group
    ends at). A tile past the last one in use gets an empty row range. Groups beyond num_rows are clipped as
    ragged_dot clips them."""
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.minimum(jnp.cumsum(sizes), num_rows)
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends[:-1]])
    tiles = pl.cdiv(ends - starts, block_rows)
    tile_ends = jnp.cumsum(tiles)
    num_tiles = pl.cdiv(num_rows, block_rows) + sizes.shape[0]
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(tile_ends, t, side="right"), sizes.shape[0] - 1).astype(jnp.int32)
    first = starts[group] + (t - (tile_ends[group] - tiles[group])) * block_rows
    used = t < tile_ends[-1]
    return group, jnp.where(used, first, 0), jnp.where(used, ends[group], 0)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "tiling"))
def _grouped_pallas(lhs, rhs, group_sizes, *, out_dtype, interpret: bool, tiling: Tiling):
    num_rows, inner = lhs.shape
    cols = rhs.shape[2]
    if num_rows == 0 or cols == 0:
        return jnp.zeros((num_rows, cols), out_dtype)
    block_rows = tiling.rows or block_rows_for(num_rows, rhs.shape[0])
    block_cols = min(tiling.cols, max(_MIN_BLOCK, next_pow2(cols)))
    block_inner = min(tiling.inner, max(_MIN_BLOCK, next_pow2(inner)))
    warps = tiling.warps or (4 if block_rows <= 64 else 8)
    group, first, end = tile_schedule(group_sizes, num_rows, block_rows)
    num_k, num_n = pl.cdiv(inner, block_inner), pl.cdiv(cols, block_cols)
    out_rows = num_rows
    if interpret:
        # The interpreter reads a block as a dynamic slice, whose start it clamps into the array: a tile that ends
        # past the rows (or a K or column block past the edge) would read shifted data. Zero padding keeps every
        # block inside; on the GPU masked lanes are never touched, so nothing is padded there.
        lhs = jnp.pad(lhs, ((0, block_rows), (0, num_k * block_inner - inner)))
        rhs = jnp.pad(rhs, ((0, 0), (0, num_k * block_inner - inner), (0, num_n * block_cols - cols)))
        out_rows = num_rows + block_rows
    out_cols = num_n * block_cols if interpret else cols
    kernel = functools.partial(_kernel, inner=inner, cols=cols, block_rows=block_rows, block_cols=block_cols,
                               block_inner=block_inner)
    out = pl.pallas_call(
        kernel,
        # Column blocks vary fastest: a tile's rows and its group's matrix stay in L2 across consecutive programs,
        # where tile-major order read each tile of the (top-k expanded) rows from HBM once per column block.
        grid=(num_n, group.shape[0]),
        out_shape=jax.ShapeDtypeStruct((out_rows, out_cols), out_dtype),
        input_output_aliases={5: 0},
        compiler_params=compiler_params(num_warps=warps, num_stages=tiling.stages),
        interpret=interpret,
        name="nexus_grouped_matmul",
    )(group, first, end, lhs, rhs, jnp.zeros((out_rows, out_cols), out_dtype))
    return out[:num_rows, :cols] if interpret else out


def _kernel(group_ref, first_ref, end_ref, lhs_ref, rhs_ref, _zeros_ref, out_ref, *, inner: int, cols: int,
            block_rows: int, block_cols: int, block_inner: int):
    """Blocks are addressed as contiguous slices (pl.ds): Triton then vectorizes the loads and pipelines them
    (cp.async). Per-lane index arrays clamped into bounds, as this kernel had, defeat its contiguity analysis. Only
    the rows are masked always (tiles are ragged); K and columns only where they do not divide into blocks."""
    col_block, tile = pl.program_id(0), pl.program_id(1)  # read outside pl.when: interpret mode needs that
    group, first, end = group_ref[tile], first_ref[tile], end_ref[tile]
    k_tail, col_tail = inner % block_inner != 0, cols % block_cols != 0

    @pl.when(first < end)
    def _():
        rows = pl.ds(first, block_rows)
        row_ok = (first + jnp.arange(block_rows) < end)[:, None]
        col0 = pl.multiple_of(col_block * block_cols, block_cols)
        col_ok = (col0 + jnp.arange(block_cols) < cols)[None, :]
        out_cols = pl.ds(col0, block_cols)

        def step(i, acc):
            k0 = pl.multiple_of(i * block_inner, block_inner)
            k_ok = k0 + jnp.arange(block_inner) < inner
            x_mask = row_ok & k_ok[None, :] if k_tail else jnp.broadcast_to(row_ok, (block_rows, block_inner))
            x = plgpu.load(lhs_ref.at[rows, pl.ds(k0, block_inner)], mask=x_mask, other=0)
            w_mask = (k_ok[:, None] if k_tail else True) & (col_ok if col_tail else True)
            w_ref = rhs_ref.at[group, pl.ds(k0, block_inner), out_cols]
            w = plgpu.load(w_ref) if w_mask is True else plgpu.load(
                w_ref, mask=jnp.broadcast_to(w_mask, (block_inner, block_cols)), other=0)
            return acc + plgpu.dot(x, w)

        acc = lax.fori_loop(0, pl.cdiv(inner, block_inner), step, jnp.zeros((block_rows, block_cols), jnp.float32))
        out_mask = row_ok & col_ok if col_tail else jnp.broadcast_to(row_ok, (block_rows, block_cols))
        plgpu.store(out_ref.at[rows, out_cols], acc.astype(out_ref.dtype), mask=out_mask)
