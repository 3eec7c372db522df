"""Reads a Hugging Face `config.json` into ModelConfig's fields, so that no field which changes the model is
dropped without a word: each one transformers reads for the architecture is implemented or refused with an error
naming it, and fields nobody here reads are listed in one warning.
"""

from __future__ import annotations

import warnings
from typing import Any

from runner.model.hf_gemma import GEMMA2, GEMMA3, GEMMA_MODEL_TYPES, GEMMA_READ, gemma_config, gemma_fields
from runner.model.hf_moe import MIXTRAL, MOE_MODEL_TYPES, MOE_READ, QWEN2_MOE, QWEN3_MOE, moe_fields

LLAMA, MISTRAL, QWEN2, QWEN3 = "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"
PHI3 = "Phi3ForCausalLM"  # Llama with fused qkv_proj and gate_up_proj tensors
SUPPORTED_ARCHITECTURES = (LLAMA, MISTRAL, QWEN2, QWEN3, PHI3, GEMMA2, GEMMA3, MIXTRAL, QWEN3_MOE,
                           QWEN2_MOE)
# A nested text_config names its language model by model_type only.
_ARCHITECTURE_OF_MODEL_TYPE = {"llama": LLAMA, "mistral": MISTRAL, "qwen2": QWEN2, "qwen3": QWEN3, "phi3": PHI3,
                               **GEMMA_MODEL_TYPES, **MOE_MODEL_TYPES}

# The fields each architecture's transformers model reads (all implemented here or refused below).
_SHARED = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
           "max_position_embeddings", "tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id"}
_QWEN_WINDOW = {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
_READ = {LLAMA: _SHARED | {"attention_bias", "mlp_bias"},
         MISTRAL: _SHARED | {"sliding_window"},
         QWEN2: _SHARED | _QWEN_WINDOW,
         QWEN3: _SHARED | _QWEN_WINDOW | {"attention_bias"},
         PHI3: _SHARED | {"sliding_window", "partial_rotary_factor", "original_max_position_embeddings"},
         MIXTRAL: _SHARED | MOE_READ[MIXTRAL],
         QWEN3_MOE: _SHARED | {"use_sliding_window", "sliding_window"} | MOE_READ[QWEN3_MOE],
         QWEN2_MOE: _SHARED | MOE_READ[QWEN2_MOE],
         **{arch: _SHARED - {"hidden_act"} | read for arch, read in GEMMA_READ.items()}}
# Fields that never change a forward pass: bookkeeping, training-only settings, generation defaults.
# pretraining_tp only split the GEMMs of old Llama code into slices with the same sum.
_INERT = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
          "initializer_range", "use_cache", "pad_token_id", "attention_dropout", "pretraining_tp", "auto_map",
          "tokenizer_class", "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
          "is_decoder", "_attn_implementation", "_attn_implementation_autoset", "resid_pdrop", "embd_pdrop"}


def model_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's keyword arguments from a config.json dict.

    Raises ValueError for quantized checkpoints, for an unsupported architecture or language model, and for any
    field that would change the computation but is not implemented; warns once about fields it does not know.
    """
    _refuse_quantized(cfg)
    cfg = _language_model(cfg)
    archs = cfg.get("architectures") or []
    if not archs:
        raise ValueError("config.json has no 'architectures' entry")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if arch in (GEMMA2, GEMMA3):
        cfg = gemma_config(cfg, arch)
    _refuse_partial_rotary(cfg)
    unknown = sorted(k for k, v in cfg.items() if k not in _READ[arch] | _INERT and v is not None)
    if unknown:
        warnings.warn(f"config.json fields that {arch} does not read here and that may change the model "
                      f"(check they are inert for this checkpoint): {', '.join(unknown)}", stacklevel=3)
    num_heads, hidden = _required(cfg, "num_attention_heads"), _required(cfg, "hidden_size")
    eos = cfg.get("eos_token_id")
    # Llama and Qwen3 put a bias on all four attention projections when attention_bias is set; Qwen2 always has
    # q/k/v biases and no o_proj bias; Mistral has none.
    attention_bias = bool(cfg.get("attention_bias", False)) and arch in (LLAMA, QWEN3, QWEN3_MOE)
    rope_scaling = _rope_scaling(cfg, arch)
    fields = dict(
        architecture=arch,
        vocab_size=_required(cfg, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_required(cfg, "intermediate_size"),
        num_layers=_required(cfg, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or hidden // num_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=_rope_theta(cfg),
        rope_scaling=rope_scaling,
        max_position_embeddings=_context_length(cfg, rope_scaling),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        # Qwen2-MoE: q/k/v biases unless qkv_bias (transformers 5.25's field) says otherwise.
        qkv_bias=arch == QWEN2 or attention_bias or (arch == QWEN2_MOE and bool(cfg.get("qkv_bias", True))),
        o_bias=attention_bias,
        mlp_bias=arch == LLAMA and bool(cfg.get("mlp_bias", False)),
        hidden_act=cfg.get("hidden_act") or "silu",
        qk_norm=arch in (QWEN3, QWEN3_MOE),
        layer_windows=_layer_windows(cfg, arch, _required(cfg, "num_hidden_layers")),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
    )
    if arch in (GEMMA2, GEMMA3):
        fields |= gemma_fields(cfg, arch, fields["num_layers"])
    if arch in (MIXTRAL, QWEN3_MOE, QWEN2_MOE):
        fields |= moe_fields(cfg, arch, fields["num_layers"])
    return fields


def _required(cfg: dict[str, Any], name: str) -> Any:
    if cfg.get(name) is None:
        raise ValueError(f"config.json has no {name!r}")
    return cfg[name]


def _refuse_quantized(cfg: dict[str, Any]) -> None:
    for where in (cfg, cfg.get("text_config") or {}):
        for key in ("quantization_config", "compression_config"):
            if where.get(key) is not None:
                method = where[key].get("quant_method", "unknown")
                raise ValueError(f"quantized checkpoints are not supported (config.json has {key} with "
                                 f"quant_method {method!r}); use the unquantized (bf16/fp16/fp32) checkpoint")


def _language_model(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config of the language model: `cfg` itself, or its text_config for a model that also takes images or
    audio (Mistral Small 3.x, Gemma 3 4B+, Llama 4, LLaVA), whose other modalities are not served."""
    text = cfg.get("text_config")
    if text is None:
        return cfg
    outer = (cfg.get("architectures") or [cfg.get("model_type", "this model")])[0]
    model_type = text.get("model_type")
    arch = _ARCHITECTURE_OF_MODEL_TYPE.get(model_type)
    if arch is None:
        raise ValueError(f"{outer} nests its language model under text_config, with model_type {model_type!r}, "
                         f"which is not supported (supported: {', '.join(_ARCHITECTURE_OF_MODEL_TYPE)}); its "
                         "other modalities (images, audio) are not served either")
    warnings.warn(f"{outer}: serving its {model_type} language model only; images, audio and other non-text "
                  "inputs are not served", stacklevel=4)
    # Token ids often live at the top level only. transformers ties the output projection by the top-level
    # tie_word_embeddings of a composite model when it has one (Mistral 3 saves its text_config's as false and
    # still ties).
    if outer == "Gemma3ForConditionalGeneration" and text.get("final_logit_softcapping"):
        # Its forward never applies it (transformers 5.25; Google's checkpoints have null there anyway).
        warnings.warn(f"final_logit_softcapping={text['final_logit_softcapping']} is ignored, as "
                      "transformers' Gemma3ForConditionalGeneration ignores it", stacklevel=4)
        text = {**text, "final_logit_softcapping": None}
    ids = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if cfg.get(k) is not None}
    tied = {"tie_word_embeddings": cfg["tie_word_embeddings"]} if "tie_word_embeddings" in cfg else {}
    return {**ids, **{k: v for k, v in text.items() if v is not None}, **tied, "architectures": [arch]}


def _layer_windows(cfg: dict[str, Any], arch: str, num_layers: int) -> tuple[int, ...]:
    """Each layer's sliding window (0: full attention), as transformers applies sliding_window: to every layer
    of Mistral; to the layers that layer_types marks (else those from max_window_layers on) of Qwen2/Qwen3, and
    only with use_sliding_window."""
    window = cfg.get("sliding_window") or 0
    if arch == QWEN3_MOE and not cfg.get("use_sliding_window"):
        return ()  # its config drops sliding_window then; with it, every layer slides
    if arch in (MISTRAL, PHI3, MIXTRAL, QWEN3_MOE):
        return (window,) * num_layers if window else ()
    if arch not in (QWEN2, QWEN3) or not cfg.get("use_sliding_window") or not window:
        return ()
    first_sliding = cfg.get("max_window_layers", 28)  # transformers' default for both
    types = cfg.get("layer_types") or ["sliding_attention" if i >= first_sliding else "full_attention"
                                       for i in range(num_layers)]
    if set(types) - {"sliding_attention", "full_attention"} or len(types) != num_layers:
        raise ValueError(f"layer_types {types} is not supported: expected {num_layers} entries of "
                         f"full_attention or sliding_attention")
    windows = tuple(window if t == "sliding_attention" else 0 for t in types)
    return windows if any(windows) else ()


def _refuse_partial_rotary(cfg: dict[str, Any]) -> None:
    # Phi-3 configs spell it at the top level or, from transformers 5, in rope_parameters.
    factor = cfg.get("partial_rotary_factor", (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise ValueError(f"partial_rotary_factor={factor} (RoPE on part of each head) is not supported")


def _context_length(cfg: dict[str, Any], rope_scaling: dict | None) -> int:
    """The longest sequence served by default: max_position_embeddings, except for the length-dependent RoPE types.
    Dynamic NTK exists to stretch a model past max_position_embeddings (its original context), by its factor.
    Longrope stops at original_max_position_embeddings: past it transformers' Phi-3 recomputes the whole KV cache
    with the long factors (Phi3ForCausalLM.prepare_inputs_for_generation), which this engine does not do."""
    context = cfg.get("max_position_embeddings", 4096)
    rope_type = (rope_scaling or {}).get("rope_type")
    if rope_type == "dynamic":
        return int(context * rope_scaling["factor"])
    if rope_type == "longrope":
        return min(context, rope_scaling["original_max_position_embeddings"])
    return context


def _rope_theta(cfg: dict[str, Any]) -> float:
    # transformers 5 moved rope_theta into rope_parameters; accept both spellings.
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))


def _rope_scaling(cfg: dict[str, Any], arch: str) -> dict | None:
    """rope_scaling (or transformers 5's rope_parameters) completed as transformers completes it; None when the
    frequencies are unscaled."""
    scaling = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if arch == PHI3 and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # what transformers reads these old Phi-3 spellings as
    scaling["rope_type"] = rope_type
    if rope_type == "dynamic":
        scaling["original_max_position_embeddings"] = cfg.get("max_position_embeddings", 4096)
    if rope_type in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in cfg:  # a top-level value wins, as in transformers
            scaling["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 4096))
    if rope_type == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = cfg.get("max_position_embeddings", 4096) / scaling["original_max_position_embeddings"]
    if rope_type == "longrope" and scaling.get("factor") is None:  # before the context is capped at the original
        scaling["factor"] = cfg.get("max_position_embeddings", 4096) / scaling["original_max_position_embeddings"]
    if rope_type in ("dynamic", "longrope"):
        _warn_length_dependent_rope(scaling, cfg)
    return scaling


def _warn_length_dependent_rope(scaling: dict, cfg: dict[str, Any]) -> None:
    """Says where per-token frequencies (runner/model/rope.py) part from transformers' per-forward-pass ones."""
    if scaling["rope_type"] == "dynamic":
        if scaling.get("factor") is None:
            raise ValueError("rope_scaling type 'dynamic' needs a 'factor'")
        warnings.warn(f"rope_scaling type 'dynamic': served up to {scaling['factor']} x max_position_embeddings; each "
                      "token is rotated with the NTK base of its own position, as transformers' generate does token "
                      "by token, but a prompt longer than max_position_embeddings is rotated by transformers with the "
                      "base of the whole prompt's length", stacklevel=4)
        return
    for key in ("short_factor", "long_factor"):
        if not isinstance(scaling.get(key), list):
            raise ValueError(f"rope_scaling type 'longrope' needs a {key!r} list")
    old_ctx = scaling["original_max_position_embeddings"]
    if cfg.get("max_position_embeddings", old_ctx) > old_ctx:
        warnings.warn(f"rope_scaling type 'longrope': served up to original_max_position_embeddings ({old_ctx} "
                      "tokens) with the short factors, as transformers; past it transformers recomputes the whole "
                      "KV cache with long_factor, which this engine does not do", stacklevel=4)
