"""Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2) over a paged KV pool.

The layers' weights are stacked on a leading axis and run under `lax.scan`, so one layer is compiled instead of
`num_layers` copies (compile time matters: every shape bucket is compiled once). The KV pool travels through the
scan as a carry and the kernels index the layer inside, so no layer slice of the pool is ever copied.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from runner.config import ModelConfig, rope_inv_freq
from runner.step_batch import StepBatch


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # Normalise in fp32 and cast back before the weight, as transformers does, so bf16 results agree.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face layout): x [T, H, D], cos/sin [T, D/2] in fp32."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    c, s = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


class DecoderLayers(nnx.Module):
    """All decoder layers, each weight stacked on a leading layer axis."""

    def __init__(self, layers: dict[str, jax.Array]):
        self.attn_norm = nnx.Param(layers["attn_norm"])
        self.qkv = nnx.Param(layers["qkv"])
        self.qkv_bias = nnx.Param(layers["qkv_bias"]) if "qkv_bias" in layers else None
        self.o = nnx.Param(layers["o"])
        self.mlp_norm = nnx.Param(layers["mlp_norm"])
        self.gate_up = nnx.Param(layers["gate_up"])
        self.down = nnx.Param(layers["down"])

    def stacked(self) -> dict[str, jax.Array]:
        names = ["attn_norm", "qkv", "o", "mlp_norm", "gate_up", "down"]
        if self.qkv_bias is not None:
            names.append("qkv_bias")
        return {n: getattr(self, n)[...] for n in names}


class Transformer(nnx.Module):
    """Decoder-only transformer; `params` follows the layout documented in runner/checkpoint.py."""

    def __init__(self, config: ModelConfig, params: dict[str, Any], kernel_impl: str | None = None):
        self.config = config
        self.kernel_impl = pk.resolve_impl(kernel_impl, head_dim=config.head_dim)
        self.embed = nnx.Param(params["embed"])
        self.layers = DecoderLayers(params["layers"])
        self.final_norm = nnx.Param(params["final_norm"])
        self.lm_head = None if config.tie_word_embeddings else nnx.Param(params["lm_head"])
        self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(config), jnp.float32))

    @property
    def dtype(self) -> jnp.dtype:
        return self.embed[...].dtype

    def params(self) -> dict[str, Any]:
        out = {"embed": self.embed[...], "layers": self.layers.stacked(), "final_norm": self.final_norm[...]}
        if self.lm_head is not None:
            out["lm_head"] = self.lm_head[...]
        return out

    def __call__(self, kv_pool: jax.Array, batch: StepBatch) -> tuple[jax.Array, jax.Array]:
        """Runs every token of `batch` through the model, writing its K/V into `kv_pool`.

        Returns (fp32 logits [len(batch.logits_indices), vocab], updated kv_pool).
        """
        cfg = self.config
        x = self.embed[...][batch.tokens]
        freqs = batch.positions.astype(jnp.float32)[:, None] * self.inv_freq[...][None, :]
        cos, sin = jnp.cos(freqs), jnp.sin(freqs)
        scale = cfg.head_dim ** -0.5
        num_decode = batch.num_decode
        impl = self.kernel_impl

        def layer(carry, w):
            x, kv, li = carry
            h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
            qkv = h @ w["qkv"]
            if "qkv_bias" in w:
                qkv = qkv + w["qkv_bias"]
            q = qkv[:, :cfg.q_size].reshape(-1, cfg.num_heads, cfg.head_dim)
            k = qkv[:, cfg.q_size:cfg.q_size + cfg.kv_size].reshape(-1, cfg.num_kv_heads, cfg.head_dim)
            v = qkv[:, cfg.q_size + cfg.kv_size:].reshape(-1, cfg.num_kv_heads, cfg.head_dim)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kv = pk.write_kv(kv, li, k, v, batch.slot_mapping, impl=impl)
            parts = []
            if num_decode:
                parts.append(pk.paged_decode_attention(
                    q[:num_decode], kv, li, batch.decode_block_tables, batch.decode_context_lens,
                    scale=scale, impl=impl))
            if batch.num_prefill_tokens:
                parts.append(pk.paged_prefill_attention(
                    q[num_decode:], kv, li, batch.prefill_block_tables, batch.prefill_q_start,
                    batch.prefill_q_lens, batch.prefill_kv_lens, scale=scale, max_q_len=batch.max_q_len,
                    impl=impl))
            attn = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
            x = x + attn.reshape(x.shape[0], cfg.q_size) @ w["o"]
            h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
            gate, up = jnp.split(h @ w["gate_up"], 2, axis=-1)
            x = x + (jax.nn.silu(gate) * up) @ w["down"]
            return (x, kv, li + 1), None

        (x, kv_pool, _), _ = jax.lax.scan(layer, (x, kv_pool, jnp.int32(0)), self.layers.stacked())
        h = rms_norm(x[batch.logits_indices], self.final_norm[...], cfg.rms_norm_eps)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        logits = jnp.dot(h, head, preferred_element_type=jnp.float32)
        return logits, kv_pool
