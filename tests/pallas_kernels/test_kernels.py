"""Paged KV write and paged attention: jnp reference vs a naive per-token numpy oracle, and the Pallas kernels
(interpret mode) vs the reference. CPU only; shapes are small because interpret mode is slow."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import backend
from pallas_kernels.decode_attention import decode_pallas
from pallas_kernels.prefill_attention import prefill_pallas


def make_pool(rng, *, layers=3, blocks=24, kv_heads=2, block_size=16, head_dim=64, dtype=jnp.float32):
    pool = rng.standard_normal((layers, 2, blocks, kv_heads, block_size, head_dim), dtype=np.float32)
    return jnp.asarray(pool, dtype)


def make_tables(rng, num_seqs, max_blocks, num_blocks):
    """Distinct blocks per sequence, in shuffled order (a real allocator hands out blocks in any order)."""
    return jnp.asarray(rng.permutation(num_blocks)[:num_seqs * max_blocks].reshape(num_seqs, max_blocks), jnp.int32)


def tolerance(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == jnp.float32 else {"rtol": 2e-2, "atol": 2e-2}


def jitted(fn, *args, **kwargs):
    """fn(*args, **kwargs) compiled as one program, the array arguments traced and the rest (layer, scale, window,
    impl, ...) static. Run eagerly, every jnp op of the reference path and of the kernels' wrappers compiles as a
    program of its own for each new shape (some 750 in this file, about half of its time on CPU); the model calls
    them under jit too."""
    traced = [i for i, a in enumerate(args) if isinstance(a, jax.Array)]

    def call(*arrays):
        full = list(args)
        for i, a in zip(traced, arrays):
            full[i] = a
        return fn(*full, **kwargs)
    return jax.jit(call)(*[args[i] for i in traced])


def naive_attention(q_row, pool, layer, table, num_kv, scale, group, window=0, softcap=0.0):
    """Attention of one query token [Hq, D] over the first num_kv tokens of a page table (the last `window` of
    them if window > 0, scores soft-capped at `softcap` if > 0), per token in f64."""
    pool = np.asarray(pool, np.float64)  # a no-op for the f64 numpy pool naive_decode and naive_prefill pass
    block_size = pool.shape[4]
    out = np.zeros(q_row.shape)
    seen = range(max(0, num_kv - window) if window else 0, num_kv)
    for h in range(q_row.shape[0]):
        keys = np.stack([pool[layer, 0, table[p // block_size], h // group, p % block_size] for p in seen])
        vals = np.stack([pool[layer, 1, table[p // block_size], h // group, p % block_size] for p in seen])
        scores = keys @ np.asarray(q_row[h], np.float64) * scale
        if softcap:
            scores = softcap * np.tanh(scores / softcap)
        probs = np.exp(scores - scores.max())
        out[h] = probs @ vals / probs.sum()
    return out


def naive_decode(q, pool, layer, tables, context_lens, scale, window=0, softcap=0.0):
    q, tables, context_lens = np.asarray(q, np.float64), np.asarray(tables), np.asarray(context_lens)
    pool = np.asarray(pool, np.float64)  # once, not per query row
    group = q.shape[1] // pool.shape[3]
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        if context_lens[b]:
            out[b] = naive_attention(q[b], pool, layer, tables[b], context_lens[b], scale, group, window, softcap)
    return out


def naive_prefill(q, pool, layer, tables, q_start, q_lens, kv_lens, scale, window=0, softcap=0.0):
    q, tables = np.asarray(q, np.float64), np.asarray(tables)
    # On the host once: indexing a jax array, or converting the pool, per query row costs a transfer each time
    # (and a compiled program per new shape).
    pool, q_start, q_lens, kv_lens = np.asarray(pool, np.float64), *map(np.asarray, (q_start, q_lens, kv_lens))
    group = q.shape[1] // pool.shape[3]
    out = np.zeros(q.shape)
    for s in range(tables.shape[0]):
        prefix = int(kv_lens[s]) - int(q_lens[s])
        for i in range(int(q_lens[s])):
            row = int(q_start[s]) + i
            out[row] = naive_attention(q[row], pool, layer, tables[s], prefix + i + 1, scale, group, window,
                                       softcap)
    return out


def decode_case(rng, *, batch, group, kv_heads, head_dim, block_size, max_blocks, dtype):
    pool = make_pool(rng, kv_heads=kv_heads, block_size=block_size, head_dim=head_dim, dtype=dtype,
                     blocks=batch * max_blocks + 3)
    tables = make_tables(rng, batch, max_blocks, pool.shape[2])
    # Ragged: a full table, a partial last page, a single token, and a padding row (0) when batch allows.
    lens = [max_blocks * block_size, max_blocks * block_size - block_size // 2 - 1, 1, 0]
    lens += list(rng.integers(1, max_blocks * block_size + 1, size=max(0, batch - 4)))
    context_lens = jnp.asarray(lens[:batch], jnp.int32)
    q = jnp.asarray(rng.standard_normal((batch, group * kv_heads, head_dim)), dtype)
    return q, pool, tables, context_lens


def prefill_case(rng, *, group, kv_heads, head_dim, block_size, dtype, q_lens, prefixes, tail):
    """Packed sequences back to back, then `tail` rows owned by none; the last entry of q_lens may be 0."""
    max_blocks = -(-max(q + p for q, p in zip(q_lens, prefixes)) // block_size)
    pool = make_pool(rng, kv_heads=kv_heads, block_size=block_size, head_dim=head_dim, dtype=dtype,
                     blocks=len(q_lens) * max_blocks + 2)
    tables = make_tables(rng, len(q_lens), max_blocks, pool.shape[2])
    q_start = np.concatenate([[0], np.cumsum(q_lens)[:-1]])
    kv_lens = np.asarray(q_lens) + np.asarray(prefixes)
    q = jnp.asarray(rng.standard_normal((sum(q_lens) + tail, group * kv_heads, head_dim)), dtype)
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return q, pool, tables, i32(q_start), i32(q_lens), i32(kv_lens)


# ---- reference vs naive oracle (fp32) -------------------------------------------------------------------------

@pytest.mark.parametrize("group,head_dim,block_size,window", [(1, 64, 16, 0), (4, 128, 8, 0), (8, 64, 16, 0),
                                                              (4, 64, 16, 21), (1, 64, 8, 1)])
def test_decode_reference_matches_naive(group, head_dim, block_size, window):
    rng = np.random.default_rng(group * 1000 + head_dim + block_size)
    q, pool, tables, lens = decode_case(rng, batch=6, group=group, kv_heads=2, head_dim=head_dim,
                                        block_size=block_size, max_blocks=5, dtype=jnp.float32)
    out = jitted(pk.paged_decode_attention, q, pool, 2, tables, lens, scale=0.125, window=window, impl="xla")
    assert out.shape == q.shape and out.dtype == q.dtype
    want = naive_decode(q, pool, 2, tables, lens, 0.125, window)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(out[3])), "context_len 0 must give zeros"


@pytest.mark.parametrize("group,head_dim,block_size,window", [(1, 64, 16, 0), (4, 128, 8, 0), (8, 64, 16, 0),
                                                              (4, 64, 16, 9), (1, 64, 8, 1)])
def test_prefill_reference_matches_naive(group, head_dim, block_size, window):
    rng = np.random.default_rng(group * 100 + head_dim + block_size)
    case = prefill_case(rng, group=group, kv_heads=2, head_dim=head_dim, block_size=block_size,
                        dtype=jnp.float32, q_lens=[7, 20, 1, 0], prefixes=[0, 13, 30, 0], tail=3)
    q, pool, tables, q_start, q_lens, kv_lens = case
    out = jitted(pk.paged_prefill_attention, q, pool, 1, tables, q_start, q_lens, kv_lens, scale=0.1,
                 max_q_len=20, window=window, impl="xla")
    want = naive_prefill(q, pool, 1, tables, q_start, q_lens, kv_lens, 0.1, window)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(out[28:])), "rows owned by no sequence must be zeros"


def test_write_kv_reference_scatters_and_skips_padding():
    rng = np.random.default_rng(7)
    pool = make_pool(rng, blocks=6, block_size=4, head_dim=16)
    k = jnp.asarray(rng.standard_normal((5, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((5, 2, 16)), jnp.float32)
    slots = jnp.asarray([13, -1, 0, 23, -5], jnp.int32)
    out = np.asarray(jitted(pk.write_kv, pool, 2, k, v, slots, impl="xla"))
    want = np.array(pool)
    for t, slot in enumerate(np.asarray(slots)):
        if slot >= 0:
            want[2, 0, slot // 4, :, slot % 4] = k[t]
            want[2, 1, slot // 4, :, slot % 4] = v[t]
    np.testing.assert_array_equal(out, want)


def test_xla_path_accepts_traced_layer():
    rng = np.random.default_rng(3)
    q, pool, tables, lens = decode_case(rng, batch=4, group=2, kv_heads=2, head_dim=64, block_size=16,
                                        max_blocks=2, dtype=jnp.float32)
    run = jax.jit(lambda layer: pk.paged_decode_attention(q, pool, layer, tables, lens, scale=0.2, impl="xla"))
    np.testing.assert_allclose(run(jnp.int32(1)), naive_decode(q, pool, 1, tables, lens, 0.2), rtol=1e-5, atol=1e-5)


# ---- Pallas kernels (interpret mode) vs reference --------------------------------------------------------------

@pytest.mark.parametrize("dtype,block_size,head_dim", [(jnp.float32, 16, 64), (jnp.bfloat16, 8, 128)])
def test_write_kv_pallas_matches_reference(dtype, block_size, head_dim):
    rng = np.random.default_rng(11)
    pool = make_pool(rng, blocks=10, block_size=block_size, head_dim=head_dim, dtype=dtype)
    tokens = 70  # more than one 64-token program, with a ragged last one
    slots = rng.permutation(10 * block_size)[:tokens]
    slots[rng.random(tokens) < 0.2] = -1
    slots = jnp.asarray(slots, jnp.int32)
    k = jnp.asarray(rng.standard_normal((tokens, 2, head_dim)), jnp.float32)  # cast to the pool dtype inside
    v = jnp.asarray(rng.standard_normal((tokens, 2, head_dim)), jnp.float32)
    got = np.asarray(jitted(pk.write_kv, pool, 1, k, v, slots, impl="interpret").astype(jnp.float32))
    want = np.asarray(jitted(pk.write_kv, pool, 1, k, v, slots, impl="xla").astype(jnp.float32))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[[0, 2]], np.asarray(pool.astype(jnp.float32))[[0, 2]])


@pytest.mark.parametrize("dtype,group,head_dim,block_size", [
    (jnp.float32, 4, 64, 16), (jnp.bfloat16, 8, 128, 8), (jnp.float32, 1, 64, 32)])
def test_decode_pallas_matches_reference(dtype, group, head_dim, block_size):
    rng = np.random.default_rng(group + head_dim)
    q, pool, tables, lens = decode_case(rng, batch=5, group=group, kv_heads=2, head_dim=head_dim,
                                        block_size=block_size, max_blocks=4, dtype=dtype)
    got = jitted(pk.paged_decode_attention, q, pool, 2, tables, lens, scale=0.1, impl="interpret")
    want = jitted(pk.paged_decode_attention, q, pool, 2, tables, lens, scale=0.1, impl="xla")
    assert got.dtype == q.dtype
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), **tolerance(dtype))
    assert not np.any(np.asarray(got[3].astype(jnp.float32)))


def test_decode_pallas_split_k_merges_partials():
    rng = np.random.default_rng(5)
    q, pool, tables, lens = decode_case(rng, batch=4, group=4, kv_heads=2, head_dim=64, block_size=16,
                                        max_blocks=6, dtype=jnp.float32)
    # 3 splits of 32 tokens: the shorter sequences leave whole splits empty, which must weigh nothing.
    got = decode_pallas(q, pool, jnp.asarray([1], jnp.int32), tables, lens, scale=0.1, interpret=True,
                        num_splits=3, block_tokens=16)
    want = jitted(pk.paged_decode_attention, q, pool, 1, tables, lens, scale=0.1, impl="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,group,head_dim,block_size,q_lens,prefixes", [
    (jnp.float32, 4, 64, 16, [150, 9, 0], [0, 40, 0]),
    (jnp.bfloat16, 8, 128, 8, [20, 33, 1], [70, 0, 5]),
    (jnp.float32, 1, 64, 16, [5, 0, 3], [3, 0, 0]),
])
def test_prefill_pallas_matches_reference(dtype, group, head_dim, block_size, q_lens, prefixes):
    rng = np.random.default_rng(sum(q_lens) + group)
    case = prefill_case(rng, group=group, kv_heads=2, head_dim=head_dim, block_size=block_size, dtype=dtype,
                        q_lens=q_lens, prefixes=prefixes, tail=4)
    q, pool, tables, q_start, q_lens_a, kv_lens = case
    kwargs = dict(scale=0.1, max_q_len=max(q_lens))
    args = (q, pool, 2, tables, q_start, q_lens_a, kv_lens)
    got = jitted(pk.paged_prefill_attention, *args, impl="interpret", **kwargs)
    want = jitted(pk.paged_prefill_attention, *args, impl="xla", **kwargs)
    assert got.dtype == q.dtype
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), **tolerance(dtype))
    assert not np.any(np.asarray(got[sum(q_lens):].astype(jnp.float32)))


@pytest.mark.parametrize("window,num_splits", [(21, 3), (40, 3), (5, None)])
def test_decode_pallas_sliding_window(window, num_splits):
    """Splits wholly before the window stay empty; the window starts mid-page and mid-split."""
    rng = np.random.default_rng(window)
    q, pool, tables, lens = decode_case(rng, batch=4, group=4, kv_heads=2, head_dim=64, block_size=16,
                                        max_blocks=6, dtype=jnp.float32)
    got = decode_pallas(q, pool, jnp.asarray([1], jnp.int32), tables, lens, scale=0.1, window=window,
                        interpret=True, num_splits=num_splits, block_tokens=16)
    want = jitted(pk.paged_decode_attention, q, pool, 1, tables, lens, scale=0.1, window=window, impl="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    full = jitted(pk.paged_decode_attention, q, pool, 1, tables, lens, scale=0.1, impl="xla")
    assert not np.allclose(got[:2], full[:2], atol=1e-3), "the window must change rows longer than it"


@pytest.mark.parametrize("window,blocks", [(1, 16), (13, 16), (40, 16), (100, None)])
def test_prefill_pallas_sliding_window(window, blocks):
    """Prompts several windows long, after a cached prefix: rows whose window starts past the first row's
    block, blocks wholly inside every row's window, and windows shorter than a KV block."""
    rng = np.random.default_rng(window)
    q_lens, prefixes = [150, 9, 0], [30, 170, 0]
    q, pool, tables, q_start, q_lens_a, kv_lens = prefill_case(
        rng, group=4, kv_heads=2, head_dim=64, block_size=16, dtype=jnp.float32, q_lens=q_lens,
        prefixes=prefixes, tail=4)
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    tiles = {} if blocks is None else {"block_q": blocks, "block_kv": blocks}
    got = prefill_pallas(q, pool, i32([2]), tables, q_start, q_lens_a, kv_lens, scale=0.1, max_q_len=150,
                         window=window, interpret=True, **tiles)
    want = jitted(pk.paged_prefill_attention, q, pool, 2, tables, q_start, q_lens_a, kv_lens, scale=0.1,
                  max_q_len=150, window=window, impl="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(got[sum(q_lens):]))


# Soft-capping: scale 0.5 on unit-normal q and k of 64 dims makes scores of about +-4, so a cap of 3 bends most.
SOFTCAP_SCALE, SOFTCAP = 0.5, 3.0


@pytest.mark.parametrize("window", [0, 21])
def test_softcap_reference_matches_naive(window):
    rng = np.random.default_rng(77 + window)
    q, pool, tables, lens = decode_case(rng, batch=5, group=2, kv_heads=2, head_dim=64, block_size=16,
                                        max_blocks=4, dtype=jnp.float32)
    out = jitted(pk.paged_decode_attention, q, pool, 0, tables, lens, scale=SOFTCAP_SCALE, window=window,
                 logit_softcap=SOFTCAP, impl="xla")
    want = naive_decode(q, pool, 0, tables, lens, SOFTCAP_SCALE, window, SOFTCAP)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    uncapped = naive_decode(q, pool, 0, tables, lens, SOFTCAP_SCALE, window)
    assert not np.allclose(want, uncapped, atol=1e-2), "the cap must matter at these scores"
    case = prefill_case(rng, group=2, kv_heads=2, head_dim=64, block_size=8, dtype=jnp.float32,
                        q_lens=[7, 20, 0], prefixes=[0, 13, 0], tail=2)
    q, pool, tables, q_start, q_lens, kv_lens = case
    out = jitted(pk.paged_prefill_attention, q, pool, 1, tables, q_start, q_lens, kv_lens, scale=SOFTCAP_SCALE,
                 max_q_len=20, window=window, logit_softcap=SOFTCAP, impl="xla")
    want = naive_prefill(q, pool, 1, tables, q_start, q_lens, kv_lens, SOFTCAP_SCALE, window, SOFTCAP)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,num_splits", [(0, 3), (21, 2)])
def test_decode_pallas_softcap(window, num_splits):
    rng = np.random.default_rng(window + 5)
    q, pool, tables, lens = decode_case(rng, batch=4, group=4, kv_heads=2, head_dim=64, block_size=16,
                                        max_blocks=6, dtype=jnp.float32)
    got = decode_pallas(q, pool, jnp.asarray([1], jnp.int32), tables, lens, scale=SOFTCAP_SCALE, window=window,
                        logit_softcap=SOFTCAP, interpret=True, num_splits=num_splits, block_tokens=16)
    want = jitted(pk.paged_decode_attention, q, pool, 1, tables, lens, scale=SOFTCAP_SCALE, window=window,
                  logit_softcap=SOFTCAP, impl="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 13])
def test_prefill_pallas_softcap(window):
    """Both the unmasked and the masked KV blocks cap their scores (block_kv 16 over prompts of 40 and 59 tokens)."""
    rng = np.random.default_rng(window + 9)
    q_lens, prefixes = [40, 9, 0], [30, 50, 0]
    q, pool, tables, q_start, q_lens_a, kv_lens = prefill_case(
        rng, group=2, kv_heads=2, head_dim=64, block_size=16, dtype=jnp.float32, q_lens=q_lens,
        prefixes=prefixes, tail=3)
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    got = prefill_pallas(q, pool, i32([2]), tables, q_start, q_lens_a, kv_lens, scale=SOFTCAP_SCALE, max_q_len=40,
                         window=window, logit_softcap=SOFTCAP, interpret=True, block_q=16, block_kv=16)
    want = jitted(pk.paged_prefill_attention, q, pool, 2, tables, q_start, q_lens_a, kv_lens, scale=SOFTCAP_SCALE,
                  max_q_len=40, window=window, logit_softcap=SOFTCAP, impl="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---- backend choice and argument checks ------------------------------------------------------------------------

def test_auto_impl_on_cpu_is_xla_and_warns_once(caplog):
    backend._auto_impl.cache_clear()
    backend._fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.backend"):
        assert pk.resolve_impl(None) == "xla"
        assert pk.resolve_impl(None) == "xla"
    assert len([r for r in caplog.records if "XLA" in r.getMessage()]) == 1
    assert pk.resolve_impl("interpret") == "interpret"
    with pytest.raises(ValueError, match="unknown kernel impl"):
        pk.resolve_impl("cuda")


def test_auto_impl_falls_back_for_head_dims_pallas_cannot_run(monkeypatch, caplog):
    monkeypatch.setattr(backend, "_auto_impl", lambda: "pallas")  # as on a capable GPU
    backend._fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.backend"):
        assert pk.resolve_impl(None, 128) == "pallas"
        assert pk.resolve_impl(None, 80) == "xla"
    assert any("head_dim 80" in r.getMessage() for r in caplog.records)
    assert pk.resolve_impl("pallas", 80) == "pallas"  # an explicit choice is kept (and the kernel raises)


def test_bad_shapes_raise():
    rng = np.random.default_rng(0)
    pool = make_pool(rng, blocks=4, head_dim=64)
    q = jnp.zeros((2, 3, 64))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        pk.paged_decode_attention(q, pool, 0, jnp.zeros((2, 2), jnp.int32), jnp.ones(2, jnp.int32), scale=1.0)
    with pytest.raises(ValueError, match="kv_pool must be"):
        pk.write_kv(pool[0], 0, jnp.zeros((1, 2, 64)), jnp.zeros((1, 2, 64)), jnp.zeros(1, jnp.int32))
    with pytest.raises(ValueError, match="max_q_len"):
        pk.paged_prefill_attention(jnp.zeros((4, 2, 64)), pool, 0, jnp.zeros((1, 2), jnp.int32),
                                   jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32), jnp.ones(1, jnp.int32),
                                   scale=1.0, max_q_len=0)
