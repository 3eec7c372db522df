"""Rotary position embeddings: the frequencies of every rope_scaling type, as transformers computes them, and the
cos/sin of a step's tokens.

Two types change their frequencies with the sequence length. transformers picks one set of frequencies per
forward pass from the largest position in it; here each token is rotated by its own position (dynamic NTK: the
base for a sequence of position + 1 tokens; longrope: long_factor from original_max_position_embeddings on).
That is what transformers' generate does token by token, so the two agree whenever each prompt fits within the
original context, however long generation runs past it; a longer prompt is rotated differently by transformers
(whole-pass frequencies on its first tokens too), which hf_config says in a warning at load time.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from runner.model.config import ModelConfig, rope_type_of


def rope_inv_freq(config: ModelConfig) -> list[float]:
    """Inverse frequencies per rotary pair for the types whose frequencies are fixed (for dynamic NTK and
    longrope, those of a sequence within the original context)."""
    d = config.head_dim
    inv = [1.0 / (config.rope_theta ** (2 * i / d)) for i in range(d // 2)]
    rope_type = rope_type_of(config.rope_scaling)
    s = dict(config.rope_scaling or ())
    if rope_type == "linear":
        return [f / s["factor"] for f in inv]
    if rope_type == "yarn":
        return _yarn_inv_freq(inv, s, config.rope_theta)
    if rope_type == "longrope":
        return [f / e for f, e in zip(inv, s["short_factor"])]
    if rope_type != "llama3":
        return inv
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


def _yarn_inv_freq(inv: list[float], s: dict[str, Any], base: float) -> list[float]:
    """YaRN: extrapolated (unscaled) frequencies for the fast dimensions, interpolated (divided by factor) for the
    slow ones, with a linear ramp between the dimensions that rotate beta_fast and beta_slow times over the
    original context."""
    dim, factor, old_ctx = 2 * len(inv), s["factor"], s["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high  # transformers' guard against a zero-width ramp
    out = []
    for i, f in enumerate(inv):
        extrapolate = 1 - min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(f / factor * (1 - extrapolate) + f * extrapolate)
    return out


def rope_attention_factor(config: ModelConfig) -> float:
    """What cos and sin are multiplied by: YaRN's and longrope's attention temperature, 1 for the other types."""
    rope_type = rope_type_of(config.rope_scaling)
    s = dict(config.rope_scaling or ())
    if rope_type == "longrope":
        if s.get("attention_factor") is not None:
            return float(s["attention_factor"])
        old_ctx = s["original_max_position_embeddings"]
        factor = s["factor"]
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_ctx))
    if rope_type != "yarn":
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(s["factor"], s["mscale"]) / mscale(s["factor"], s["mscale_all_dim"])
    return mscale(s["factor"])


def _token_inv_freq(config: ModelConfig, positions: jax.Array) -> jax.Array:
    """[T, D/2] inverse frequencies of each token (they differ by token only for dynamic NTK and longrope)."""
    base = jnp.asarray(rope_inv_freq(config), jnp.float32)[None, :]
    rope_type = rope_type_of(config.rope_scaling)
    s = dict(config.rope_scaling or ())
    if rope_type == "longrope":
        theta = config.rope_theta ** (jnp.arange(0, config.head_dim, 2, dtype=jnp.float32) / config.head_dim)
        long = 1.0 / (jnp.asarray(s["long_factor"], jnp.float32) * theta)
        beyond = positions[:, None] >= s["original_max_position_embeddings"]
        return jnp.where(beyond, long[None, :], base)
    if rope_type == "dynamic":
        # transformers' NTK base for a sequence of `seq_len` tokens; seq_len <= max_position_embeddings keeps
        # the original frequencies.
        old_ctx, factor, dim = s["original_max_position_embeddings"], s["factor"], config.head_dim
        seq_len = jnp.maximum(positions + 1, old_ctx).astype(jnp.float32)[:, None]
        ntk = config.rope_theta * ((factor * seq_len / old_ctx) - (factor - 1)) ** (dim / (dim - 2))
        scaled = 1.0 / ntk ** (jnp.arange(0, dim, 2, dtype=jnp.float32)[None, :] / dim)
        return jnp.where(positions[:, None] + 1 > old_ctx, scaled, base)
    return base


def rope_cos_sin(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [T, D/2] (fp32, times the attention factor) of tokens at `positions` [T]."""
    freqs = positions.astype(jnp.float32)[:, None] * _token_inv_freq(config, positions)
    factor = rope_attention_factor(config)
    return factor * jnp.cos(freqs), factor * jnp.sin(freqs)
