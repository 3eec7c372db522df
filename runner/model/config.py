"""Model configuration, read from a Hugging Face `config.json` or a preset in `configs/`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from configs import CONFIGS_DIR
from runner.model.activations import ACTIVATIONS
from runner.model.hf_config import SUPPORTED_ARCHITECTURES, model_fields

# The frequencies of each type are computed in runner/model/rope.py.
ROPE_TYPES = ("default", "llama3", "linear", "yarn", "dynamic", "longrope")
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
DTYPE_NAMES = ("auto", *DTYPES)


def parse_dtype(dtype: str) -> Any:
    """A dtype name as a jnp dtype. "auto" is bfloat16 on accelerators and float32 on CPU, where XLA's scatter
    into a bfloat16 KV pool is not done in place (measured: a 67 MB pool made a tiny model's decode step take
    110 ms in bfloat16 against 5 ms in float32)."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    if dtype == "auto":
        import jax
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return DTYPES[dtype]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Only the `llama3` rope type changes the frequencies; `default`/None leave them alone. Given as a dict, kept
    # as sorted (key, value) pairs so the config stays hashable (it is static in jitted functions).
    rope_scaling: tuple[tuple[str, Any], ...] | dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    # The variations of the Llama layout (RMSNorm, gated MLP, RoPE, GQA) that the supported families use.
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False  # on gate, up and down
    hidden_act: str = "silu"
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    # Sliding-window size of each layer, 0 for full attention; empty when no layer has a window.
    layer_windows: tuple[int, ...] = ()
    # Gemma 2/3 options (runner/model/hf_gemma.py).
    norm_plus_one: bool = False   # RMSNorm scales by (1 + w), multiplied in fp32
    sandwich_norm: bool = False   # attention and MLP outputs normed too, before each residual add
    embed_scale: bool = False     # embeddings times sqrt(hidden_size), rounded to the weights' dtype
    attn_scale: float = 0.0       # scale of the attention scores; 0: head_dim ** -0.5
    attn_logit_softcap: float = 0.0   # 0: none; else scores x -> cap * tanh(x / cap)
    final_logit_softcap: float = 0.0  # the same on the output logits
    rope_local_theta: float = 0.0     # RoPE base of the sliding-window layers, default type; 0: the global RoPE
    # Mixture of experts on every layer's MLP (runner/model/moe.py); num_experts 0: a dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum to 1
    shared_expert_intermediate_size: int = 0  # a shared expert every token goes through, sigmoid-gated (Qwen2-MoE)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..{self.num_experts}, got {self.num_experts_per_tok}")
        if self.num_experts and self.moe_intermediate_size <= 0:
            raise ValueError(f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
        object.__setattr__(self, "layer_windows", tuple(self.layer_windows))  # JSON gives a list
        if self.layer_windows and (len(self.layer_windows) != self.num_layers or min(self.layer_windows) < 0):
            raise ValueError(f"layer_windows must hold {self.num_layers} sizes >= 0, got {self.layer_windows}")
        if isinstance(self.rope_scaling, dict):  # lists (longrope's factors) as tuples, to stay hashable
            items = ((k, tuple(v) if isinstance(v, list) else v) for k, v in self.rope_scaling.items())
            object.__setattr__(self, "rope_scaling", tuple(sorted(items)))
        rope_type = rope_type_of(self.rope_scaling)
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        for key in ("short_factor", "long_factor") if rope_type == "longrope" else ():
            if len(dict(self.rope_scaling).get(key) or ()) != self.head_dim // 2:
                raise ValueError(f"rope_scaling {key} must hold head_dim / 2 = {self.head_dim // 2} factors")

    def window(self, layer: int) -> int:
        """The sliding-window size of `layer`, 0 when it attends the whole context."""
        return self.layer_windows[layer] if self.layer_windows else 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        mlp = 3 * h * i if not self.num_experts else self.num_experts * (3 * h * self.moe_intermediate_size + h)
        mlp += (3 * h * self.shared_expert_intermediate_size + h) if self.shared_expert_intermediate_size else 0
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + mlp + 2 * h
        per_layer += self.qkv_bias * (self.q_size + 2 * self.kv_size) + self.o_bias * h
        per_layer += self.mlp_bias * (2 * i + h) + self.qk_norm * 2 * self.head_dim + self.sandwich_norm * 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + h

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """From a config.json dict; refuses what would run wrong (see runner/model/hf_config.py)."""
        return cls(**model_fields(cfg))

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        path = CONFIGS_DIR / f"{name}.json"
        if not path.is_file():
            known = sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(known)}")
        return cls.from_json(path)


def rope_type_of(rope_scaling: tuple | dict | None) -> str:
    if not rope_scaling:
        return "default"
    rope_scaling = dict(rope_scaling)
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
