"""Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2/3, Mixtral, Qwen2/3-MoE) over a
paged KV pool: optional biases, q/k norms, per-layer sliding windows and RoPE bases, Gemma's (1 + w) and sandwich norms,
scaled embeddings and soft-capped logits, and mixture-of-experts MLPs (runner/model/moe.py), as
runner/model/hf_config.py reads them from config.json.

The layers are unrolled over per-layer weight arrays. Under `lax.scan` over stacked weights, XLA on a GPU copies
each layer's dynamic slice of a weight before its GEMM, which doubled the weight traffic of a decode step
(measured on an H100 for the Llama-3.1-8B shape at batch 64 x 2048: 22.5 ms scanned, 13.9 ms unrolled, against
an 11.3 ms floor; compile time 4.3 s against 6.1 s). The one KV pool passes through every layer and the kernels
index the layer inside it, so no layer slice of the pool is ever copied.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from runner.model.activations import ACTIVATIONS
from runner.model.config import ModelConfig
from runner.model.moe import moe_mlp
from runner.model.rope import rope_cos_sin
from runner.step_batch import StepBatch


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
    """RMSNorm as transformers computes it, so bf16 results agree: Llama casts back to x's dtype before the
    weight; Gemma scales by (1 + w) in fp32 and casts after."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (xf * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * xf.astype(x.dtype)


def softcap(x: jax.Array, cap: float) -> jax.Array:
    return cap * jnp.tanh(x / cap) if cap else x


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face layout): x [T, H, D], cos/sin [T, D/2] in fp32."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    c, s = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


class LayerWeights(nnx.Module):
    """One decoder layer's weights; the optional ones are None where the config has none."""

    REQUIRED = ("attn_norm", "qkv", "o", "mlp_norm")
    OPTIONAL = ("gate_up", "down", "router", "experts_gate_up", "experts_down", "shared_gate_up", "shared_down",
                "shared_gate", "qkv_bias", "o_bias",
                "gate_up_bias", "down_bias", "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm")

    def __init__(self, layers: dict[str, jax.Array]):
        for name in self.REQUIRED + self.OPTIONAL:
            setattr(self, name, nnx.Param(layers[name]) if name in layers else None)

    def arrays(self) -> dict[str, jax.Array]:
        return {n: getattr(self, n)[...] for n in self.REQUIRED + self.OPTIONAL if getattr(self, n) is not None}


@jax.jit
def _unstack(stacked: jax.Array) -> tuple[jax.Array, ...]:
    """Each layer's slice of a weight stacked over layers, by one program: slicing eagerly dispatched one per layer
    and weight (192 for the 8B shape, 0.38 s of a warm start on an H100, benchmarks/RESULTS.md)."""
    return tuple(stacked[i] for i in range(stacked.shape[0]))


def _linear(x: jax.Array, w: dict[str, jax.Array], name: str) -> jax.Array:
    y = x @ w[name]
    return y + w[name + "_bias"] if name + "_bias" in w else y


class Transformer(nnx.Module):
    """Decoder-only transformer; `params` follows the layout documented in runner/checkpoint.py."""

    def __init__(self, config: ModelConfig, params: dict[str, Any], kernel_impl: str | None = None,
                 release_stacked: bool = False):
        """`params["layers"]` holds each weight stacked over layers (the checkpoint layout); the model keeps
        per-layer copies. release_stacked=True deletes each stacked array as soon as it is split, so device
        memory peaks at the weights plus one stacked array instead of twice the weights."""
        self.config = config
        self.kernel_impl = pk.resolve_impl(kernel_impl, head_dim=config.head_dim)
        self.embed = nnx.Param(params["embed"])
        per_layer: list[dict[str, jax.Array]] = [{} for _ in range(config.num_layers)]
        for name, stacked in params["layers"].items():
            for layer, weight in zip(per_layer, _unstack(stacked)):
                layer[name] = weight
            if release_stacked:
                stacked.delete()
        self.layers = nnx.List([LayerWeights(layer) for layer in per_layer])
        self.final_norm = nnx.Param(params["final_norm"])
        self.lm_head = None if config.tie_word_embeddings else nnx.Param(params["lm_head"])

    @property
    def dtype(self) -> jnp.dtype:
        return self.embed[...].dtype

    def __call__(self, kv_pool: jax.Array, batch: StepBatch) -> tuple[jax.Array, jax.Array]:
        """Runs every token of `batch` through the model, writing its K/V into `kv_pool`.

        Returns (fp32 logits [len(batch.logits_indices), vocab], updated kv_pool).
        """
        cfg = self.config
        x = self.embed[...][batch.tokens]
        if cfg.embed_scale:  # transformers rounds sqrt(hidden_size) to the embeddings' dtype first
            x = x * jnp.asarray(cfg.hidden_size ** 0.5, x.dtype)
        rope = {False: rope_cos_sin(cfg, batch.positions)}
        if cfg.rope_local_theta:  # sliding-window layers rotate with their own base and no scaling (Gemma 3)
            local = dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta, rope_scaling=None)
            rope[True] = rope_cos_sin(local, batch.positions)
        scale = cfg.attn_scale or cfg.head_dim ** -0.5
        softcap_attn = cfg.attn_logit_softcap
        num_decode = batch.num_decode
        impl = self.kernel_impl
        act = ACTIVATIONS[cfg.hidden_act]

        def norm(x, weight):
            return rms_norm(x, weight, cfg.rms_norm_eps, cfg.norm_plus_one)

        def layer(x, kv, li, w):
            h = norm(x, w["attn_norm"])
            qkv = _linear(h, w, "qkv")
            q = qkv[:, :cfg.q_size].reshape(-1, cfg.num_heads, cfg.head_dim)
            k = qkv[:, cfg.q_size:cfg.q_size + cfg.kv_size].reshape(-1, cfg.num_kv_heads, cfg.head_dim)
            v = qkv[:, cfg.q_size + cfg.kv_size:].reshape(-1, cfg.num_kv_heads, cfg.head_dim)
            if cfg.qk_norm:
                q, k = norm(q, w["q_norm"]), norm(k, w["k_norm"])
            cos, sin = rope[bool(cfg.rope_local_theta and cfg.window(li))]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kv = pk.write_kv(kv, li, k, v, batch.slot_mapping, impl=impl)
            parts = []
            if num_decode:
                parts.append(pk.paged_decode_attention(
                    q[:num_decode], kv, li, batch.decode_block_tables, batch.decode_context_lens,
                    scale=scale, window=cfg.window(li), logit_softcap=softcap_attn, impl=impl))
            if batch.num_prefill_tokens:
                parts.append(pk.paged_prefill_attention(
                    q[num_decode:], kv, li, batch.prefill_block_tables, batch.prefill_q_start,
                    batch.prefill_q_lens, batch.prefill_kv_lens, scale=scale, max_q_len=batch.max_q_len,
                    window=cfg.window(li), logit_softcap=softcap_attn, impl=impl))
            attn = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
            h = _linear(attn.reshape(x.shape[0], cfg.q_size), w, "o")
            x = x + (norm(h, w["post_attn_norm"]) if cfg.sandwich_norm else h)
            h = norm(x, w["mlp_norm"])
            if cfg.num_experts:
                h = moe_mlp(h, w, cfg.num_experts_per_tok, cfg.norm_topk_prob, act, impl)
            else:
                gate, up = jnp.split(_linear(h, w, "gate_up"), 2, axis=-1)
                h = _linear(act(gate) * up, w, "down")
            x = x + (norm(h, w["post_mlp_norm"]) if cfg.sandwich_norm else h)
            return x, kv

        for li, weights in enumerate(self.layers):
            x, kv_pool = layer(x, kv_pool, li, weights.arrays())
        h = rms_norm(x[batch.logits_indices], self.final_norm[...], cfg.rms_norm_eps, cfg.norm_plus_one)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        logits = jnp.dot(h, head, preferred_element_type=jnp.float32)
        return softcap(logits, cfg.final_logit_softcap), kv_pool
