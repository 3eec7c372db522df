"""The config.json fields of the mixture-of-experts families (Mixtral, Qwen3-MoE, Qwen2-MoE): what they read beyond
the Llama/Qwen ones and the ModelConfig options they turn on. runner/model/hf_config.py calls these."""

from __future__ import annotations

from typing import Any

MIXTRAL, QWEN3_MOE, QWEN2_MOE = "MixtralForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"
MOE_MODEL_TYPES = {"mixtral": MIXTRAL, "qwen3_moe": QWEN3_MOE, "qwen2_moe": QWEN2_MOE}
# Training-only router settings (jitter, auxiliary loss) change no forward pass at inference.
_ROUTER = {"num_experts_per_tok", "router_jitter_noise", "router_aux_loss_coef", "output_router_logits"}
MOE_READ = {MIXTRAL: _ROUTER | {"num_local_experts", "sliding_window"},
            QWEN3_MOE: _ROUTER | {"num_experts", "num_local_experts", "moe_intermediate_size", "norm_topk_prob",
                                  "decoder_sparse_step", "mlp_only_layers", "attention_bias",
                                  # Qwen3-30B-A3B's config.json has it; transformers' Qwen3-MoE slides every
                                  # layer when use_sliding_window, so it is read and changes nothing.
                                  "max_window_layers"},
            QWEN2_MOE: _ROUTER | {"num_experts", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                                  "mlp_only_layers", "shared_expert_intermediate_size", "qkv_bias",
                                  "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}}


def moe_fields(cfg: dict[str, Any], arch: str, num_layers: int) -> dict[str, Any]:
    """ModelConfig options of a Mixtral or Qwen3-MoE checkpoint. Every layer must be sparse: a mix of dense and
    sparse MLP layers (Qwen3-MoE's decoder_sparse_step > 1 or mlp_only_layers) is refused by name."""
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    top_k = cfg.get("num_experts_per_tok")
    if not experts or not top_k:
        raise ValueError(f"{arch} config.json needs num_experts (or num_local_experts) and num_experts_per_tok")
    if arch == QWEN2_MOE and cfg.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported for Qwen2-MoE")
    if arch == MIXTRAL:
        return dict(num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                    moe_intermediate_size=cfg["intermediate_size"])
    step, dense = cfg.get("decoder_sparse_step", 1), cfg.get("mlp_only_layers") or []
    sparse = [i not in dense and (i + 1) % step == 0 for i in range(num_layers)]
    if not all(sparse):
        raise ValueError(f"decoder_sparse_step={step} and mlp_only_layers={dense} make layers "
                         f"{[i for i, s in enumerate(sparse) if not s]} dense among sparse ones, which is not "
                         "supported (every layer must be a mixture of experts)")
    if cfg.get("moe_intermediate_size") is None:
        raise ValueError("config.json has no 'moe_intermediate_size'")
    shared = (cfg.get("shared_expert_intermediate_size") or 0) if arch == QWEN2_MOE else 0
    return dict(num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=bool(cfg.get("norm_topk_prob")),
                moe_intermediate_size=cfg["moe_intermediate_size"], shared_expert_intermediate_size=shared)
