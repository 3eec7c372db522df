"""Mixture-of-experts MLP: top-k routing as transformers' Mixtral and Qwen3-MoE routers do it, and the experts'
grouped GEMM (tokens sorted by expert, one grouped GEMM per projection, unsorted and weighted by their router
probabilities) through `pallas_kernels.grouped_matmul`: the Pallas kernel on a GPU, jax.lax.ragged_dot on the
"xla" path (which XLA's GPU backend runs as if every token met every expert: 7x slower than dense in prefill,
benchmarks/RESULTS.md). `moe_dense` computes every expert for every token with plain einsums; it is the reference
the grouped path is tested against and a baseline benchmarks/bench_moe.py times.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import grouped_matmul


def route(x: jax.Array, router: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """x [T, H], router [H, E] -> (weights [T, k] in fp32, experts [T, k] int32): softmax over all experts in
    fp32, the k largest, renormalised to sum to 1 when norm_topk_prob."""
    logits = x @ router
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def moe_ragged(x: jax.Array, weights: jax.Array, experts: jax.Array, gate_up: jax.Array, down: jax.Array,
               act: Callable[[jax.Array], jax.Array], impl: str | None = None) -> jax.Array:
    """x [T, H] through the routed experts: gate_up [E, H, 2I], down [E, I, H]; returns [T, H] in x's dtype.

    The T * k (token, expert) pairs are sorted by expert so each expert's rows are contiguous; ragged_dot then
    multiplies each group by its own expert's weights, reading each routed expert's weights once. `impl`: the
    kernel implementation (pallas_kernels.resolve_impl)."""
    num_tokens, top_k = experts.shape
    num_experts = gate_up.shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // top_k
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    rows = x[token]  # [T * k, H], grouped by expert
    gate, up = jnp.split(grouped_matmul(rows, gate_up, group_sizes, impl=impl), 2, axis=-1)
    out = grouped_matmul(act(gate) * up, down, group_sizes, impl=impl)  # [T * k, H]
    out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
    return jnp.zeros((num_tokens, x.shape[1]), out.dtype).at[token].add(out).astype(x.dtype)


def moe_dense(x: jax.Array, weights: jax.Array, experts: jax.Array, gate_up: jax.Array, down: jax.Array,
              act: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """The same as moe_ragged, computing all E experts for every token and zero-weighting the unrouted ones."""
    gate, up = jnp.split(jnp.einsum("th,ehi->tei", x, gate_up), 2, axis=-1)
    out = jnp.einsum("tei,eih->teh", act(gate) * up, down)
    combine = jnp.zeros(experts.shape[:1] + gate_up.shape[:1], jnp.float32)
    combine = combine.at[jnp.arange(experts.shape[0])[:, None], experts].add(weights)
    return jnp.einsum("teh,te->th", out, combine.astype(out.dtype)).astype(x.dtype)


def moe_mlp(x: jax.Array, w: dict[str, jax.Array], top_k: int, norm_topk_prob: bool,
            act: Callable[[jax.Array], jax.Array], impl: str | None = None) -> jax.Array:
    """One layer's sparse MLP from its weights (router, experts_gate_up, experts_down, and a shared expert's
    shared_gate_up, shared_down and sigmoid gate shared_gate when it has one)."""
    weights, experts = route(x, w["router"], top_k, norm_topk_prob)
    out = moe_ragged(x, weights, experts, w["experts_gate_up"], w["experts_down"], act, impl)
    if "shared_gate" in w:
        gate, up = jnp.split(x @ w["shared_gate_up"], 2, axis=-1)
        out = out + jax.nn.sigmoid(x @ w["shared_gate"]) * ((act(gate) * up) @ w["shared_down"])
    return out
