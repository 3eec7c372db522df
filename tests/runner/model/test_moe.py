"""The mixture-of-experts MLP: ragged_dot grouped GEMM against the dense all-experts reference, routing against
numpy, and the MoE fields of config.json (the full models are compared with transformers in test_model_hf.py)."""

import json
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from nexus_jax.testing.paths import REPO_ROOT
from runner.model.activations import ACTIVATIONS
from runner.model.config import ModelConfig
from runner.model.moe import moe_dense, moe_ragged, route


def _case(seed, tokens=37, hidden=24, inter=16, experts=8, top_k=3, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (tokens, hidden), dtype)
    router = jax.random.normal(keys[1], (hidden, experts), dtype)
    gate_up = 0.2 * jax.random.normal(keys[2], (experts, hidden, 2 * inter), dtype)
    down = 0.2 * jax.random.normal(keys[3], (experts, inter, hidden), dtype)
    return x, router, gate_up, down, top_k


@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_numpy(norm):
    x, router, _, _, top_k = _case(0)
    weights, experts = route(x, router, top_k, norm)
    logits = np.asarray(x, np.float64) @ np.asarray(router, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want_experts = np.argsort(-probs, axis=-1)[:, :top_k]
    want = np.take_along_axis(probs, want_experts, -1)
    if norm:
        want /= want.sum(-1, keepdims=True)
    np.testing.assert_array_equal(experts, want_experts)
    np.testing.assert_allclose(weights, want, rtol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "interpret"])  # jax.lax.ragged_dot; the Pallas grouped GEMM
@pytest.mark.parametrize("tokens,top_k", [(37, 3), (1, 1), (64, 8)])
def test_ragged_matches_dense(tokens, top_k, impl):
    """Including experts no token picks (empty groups) and every expert for every token (top_k = E)."""
    x, router, gate_up, down, _ = _case(tokens, tokens=tokens, top_k=top_k)
    act = ACTIVATIONS["silu"]
    weights, experts = route(x, router, top_k, True)
    got = jax.jit(moe_ragged, static_argnums=(5, 6))(x, weights, experts, gate_up, down, act, impl)
    want = moe_dense(x, weights, experts, gate_up, down, act)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _saved(config_class, **kwargs) -> dict:
    cfg = config_class(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                       num_attention_heads=2, num_key_value_heads=1, **kwargs)
    architecture = config_class.__name__.replace("Config", "ForCausalLM")
    return {"architectures": [architecture], **json.loads(cfg.to_json_string())}


def test_moe_config_fields():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every field these configs save is read or known inert
        mixtral = ModelConfig.from_hf_dict(_saved(transformers.MixtralConfig, num_local_experts=8))
        qwen = ModelConfig.from_hf_dict(_saved(transformers.Qwen3MoeConfig, num_experts=16, num_experts_per_tok=4,
                                               moe_intermediate_size=8, norm_topk_prob=True))
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.norm_topk_prob) == (8, 2, True)
    assert mixtral.moe_intermediate_size == 48 and not mixtral.qk_norm
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size, qwen.qk_norm) == (16, 4, 8, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qwen2 = ModelConfig.from_hf_dict(_saved(transformers.Qwen2MoeConfig, num_experts=4, num_experts_per_tok=2,
                                                moe_intermediate_size=8, shared_expert_intermediate_size=40))
    assert (qwen2.shared_expert_intermediate_size, qwen2.qkv_bias, qwen2.o_bias, qwen2.qk_norm) == (40, True, False,
                                                                                                      False)
    with pytest.raises(ValueError, match="use_sliding_window=true is not supported for Qwen2-MoE"):
        ModelConfig.from_hf_dict({**_saved(transformers.Qwen2MoeConfig, num_experts=4, moe_intermediate_size=8),
                                  "use_sliding_window": True})
    windowed = ModelConfig.from_hf_dict(_saved(transformers.Qwen3MoeConfig, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=8, use_sliding_window=True, sliding_window=16))
    assert windowed.layer_windows == (16,) * 4  # transformers' Qwen3-MoE slides on every layer
    dense_layers = _saved(transformers.Qwen3MoeConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                          mlp_only_layers=[1])
    with pytest.raises(ValueError, match=r"mlp_only_layers=\[1\] make layers \[1\] dense"):
        ModelConfig.from_hf_dict(dense_layers)
    with pytest.raises(ValueError, match=r"decoder_sparse_step=2.*layers \[0, 2\] dense"):
        ModelConfig.from_hf_dict({**dense_layers, "mlp_only_layers": [], "decoder_sparse_step": 2})


def test_bench_moe_quick_runs_on_cpu():
    out = subprocess.run([sys.executable, "benchmarks/bench_moe.py", "--quick", "--tilings", "auto:16:16:1,16:32:16:2"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(f"| {impl} |" in out.stdout for impl in ("pallas", "ragged_dot", "dense")) and "MFU" in out.stdout
    # both tilings at both sizes, each matching ragged_dot
    swept = [line for line in out.stdout.splitlines() if line.startswith(("| 4 |", "| 64 |")) and "e-" in line]
    assert len(swept) == 4 and all(float(line.split("|")[-2]) < 1e-4 for line in swept), out.stdout
