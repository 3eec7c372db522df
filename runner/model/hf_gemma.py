"""The config.json fields of Gemma 2 and Gemma 3 (text): what they read beyond the Llama ones, their defaults, and
the ModelConfig options they turn on. runner/model/hf_config.py calls these for the two architectures."""

from __future__ import annotations

import warnings
from typing import Any

GEMMA2, GEMMA3 = "Gemma2ForCausalLM", "Gemma3ForCausalLM"
GEMMA_MODEL_TYPES = {"gemma2": GEMMA2, "gemma3_text": GEMMA3}

_GEMMA = {"hidden_activation", "attention_bias", "query_pre_attn_scalar", "sliding_window", "layer_types",
          "attn_logit_softcapping", "final_logit_softcapping", "use_bidirectional_attention", "cache_implementation"}
GEMMA_READ = {GEMMA2: _GEMMA, GEMMA3: _GEMMA | {"rope_local_base_freq", "sliding_window_pattern",
                                                "_sliding_window_pattern"}}
# Gemma 3 image-text checkpoints (4B and up) save only the text_config fields that differ from transformers'
# Gemma3TextConfig defaults, so the missing ones are these.
_GEMMA3_DEFAULTS = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
                    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                    "query_pre_attn_scalar": 256, "sliding_window": 4096, "tie_word_embeddings": True}
_GEMMA2_DEFAULTS = {"rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
                    "sliding_window": 4096, "tie_word_embeddings": True, "head_dim": 256}


def gemma_config(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    """`cfg` with transformers' defaults filled in and transformers 5's per-layer-type rope_parameters split into
    the global RoPE (rope_parameters) and the local layers' base (rope_local_base_freq)."""
    cfg = {**(_GEMMA3_DEFAULTS if arch == GEMMA3 else _GEMMA2_DEFAULTS),
           **{k: v for k, v in cfg.items() if v is not None and k != "hidden_act"}}
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=true (an embedding model's non-causal attention) is not "
                         "supported")
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        local = params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"rope_parameters.sliding_attention rope_type {local['rope_type']!r} is not supported "
                             "(only the default RoPE on local layers)")
        if arch == GEMMA3 and "rope_theta" in local:
            cfg["rope_local_base_freq"] = local["rope_theta"]
        cfg["rope_parameters"] = params.get("full_attention") or {}
    return cfg


def gemma_fields(cfg: dict[str, Any], arch: str, num_layers: int) -> dict[str, Any]:
    """ModelConfig options of a Gemma 2/3 checkpoint (cfg as gemma_config returns it)."""
    attention_bias = bool(cfg.get("attention_bias", False))
    attn_softcap = float(cfg.get("attn_logit_softcapping") or 0.0)
    if arch == GEMMA3 and attn_softcap:
        # Gemma3Attention.forward never passes it to the attention function (transformers 5.25), so the model as
        # transformers runs it (and as Google released it, with null here) has no attention soft-capping.
        warnings.warn(f"attn_logit_softcapping={attn_softcap} is ignored for Gemma 3, as transformers ignores it",
                      stacklevel=4)
        attn_softcap = 0.0
    return dict(
        hidden_act=cfg["hidden_activation"],
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        qk_norm=arch == GEMMA3,
        norm_plus_one=True,
        sandwich_norm=True,
        embed_scale=True,
        attn_scale=float(cfg["query_pre_attn_scalar"]) ** -0.5,
        attn_logit_softcap=attn_softcap,
        final_logit_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
        rope_local_theta=float(cfg["rope_local_base_freq"]) if arch == GEMMA3 else 0.0,
        layer_windows=_gemma_windows(cfg, arch, num_layers),
    )


def _gemma_windows(cfg: dict[str, Any], arch: str, num_layers: int) -> tuple[int, ...]:
    """Local (sliding) layers as layer_types says, else as transformers derives them: every other layer from the
    first (Gemma 2), all but every sliding_window_pattern-th (Gemma 3)."""
    types = cfg.get("layer_types")
    if not types:
        if arch == GEMMA2:
            local = [i % 2 == 0 for i in range(num_layers)]
        else:
            pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
            local = [(i + 1) % pattern != 0 for i in range(num_layers)]
        types = ["sliding_attention" if is_local else "full_attention" for is_local in local]
    if set(types) - {"sliding_attention", "full_attention"} or len(types) != num_layers:
        raise ValueError(f"layer_types {types} is not supported: expected {num_layers} entries of "
                         f"full_attention or sliding_attention")
    window = cfg["sliding_window"]
    return tuple(window if t == "sliding_attention" else 0 for t in types)
