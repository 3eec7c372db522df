"""The model path against Hugging Face transformers on tiny random checkpoints (float32, CPU)."""

import zlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from runner.generate import generate
from runner.model.checkpoint import load_hf_params
from runner.model.config import ModelConfig
from runner.model_runner import ModelRunner
from runner.sampling import GREEDY_ROW
from runner.step_batch import SeqChunk, StepShapes

BLOCK = 16
VOCAB = 160
# Every prefill-only step of these tests (23-, 7- and 53-token prefills, a 9-token suffix) pads to one 64-token
# bucket, so each model compiles one prefill, one decode and one mixed forward program instead of five (~1.4 s
# each on CPU, twelve models). What is checked, logits against transformers', does not depend on the padding.
SHAPES = StepShapes(min_prefill_tokens=64)


def _hf_config(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.08, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if kind == "llama":
        return transformers.LlamaConfig(**common, rope_theta=10000.0)
    if kind == "llama3":
        return transformers.LlamaConfig(
            **common, head_dim=32, rope_theta=500000.0, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64})
    if kind == "llama_biased":  # biases on all four attention projections and the MLP, a GELU MLP, and dynamic
        # NTK RoPE switching at 48 tokens: prompts fit within it, generation runs past it
        return transformers.LlamaConfig(**{**common, "max_position_embeddings": 48}, attention_bias=True,
                                        mlp_bias=True, hidden_act="gelu",
                                        rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    if kind == "qwen2":
        return transformers.Qwen2Config(**{**common, "num_attention_heads": 8}, rope_theta=1000000.0,
                                        use_sliding_window=False)
    if kind == "mistral_window":  # every layer slides; prompts and generations run several windows long
        return transformers.MistralConfig(**common, sliding_window=12)
    if kind == "qwen3_window":  # q/k RMSNorm, a head_dim that is not hidden_size / num_heads, layer 1 slides, and
        # YaRN from a 16-token original context (its ramp and attention factor both matter)
        return transformers.Qwen3Config(**common, head_dim=32, rope_theta=1000000.0, hidden_act="gelu_pytorch_tanh",
                                        use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                        rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 16})
    if kind == "phi3_window":  # fused qkv_proj and gate_up_proj, a window on every layer, and longrope: short
        # factors per rotary pair and the attention factor of 512 / 80 (the long factors lie past the context
        # served, see test_rope.py)
        factors = np.random.default_rng(7).uniform(1.0, 6.0, (2, 8)).round(3).tolist()
        return transformers.Phi3Config(**common, sliding_window=10, original_max_position_embeddings=80,
                                       rope_scaling={"rope_type": "longrope", "short_factor": factors[0],
                                                     "long_factor": factors[1]})
    if kind == "gemma2":  # layer 0 slides (window 10), layer 1 is global; caps small enough to bend the scores
        return transformers.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=24, sliding_window=10,
                                         attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    if kind == "gemma3":  # q/k norms, linear RoPE on the global layer and a base of its own on the local one
        # (transformers' Gemma 3 ignores attn_logit_softcapping, see test_hf_config.py)
        return transformers.Gemma3TextConfig(
            **common, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=4.0,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
    if kind == "mixtral":  # 4 experts, top 2, renormalised
        return transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if kind == "qwen3_moe":  # 6 experts, top 3, not renormalised, q/k norms
        return transformers.Qwen3MoeConfig(**common, head_dim=32, num_experts=6, num_experts_per_tok=3,
                                           moe_intermediate_size=32, norm_topk_prob=False)
    if kind == "qwen2_moe":  # 4 experts, top 2, and a sigmoid-gated shared expert; q/k/v biases
        return transformers.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=48, norm_topk_prob=False)
    raise ValueError(kind)


def _perturb_biases_and_norms(hf):
    """transformers initialises biases to 0 and norm weights to 1, where dropping one changes nothing; routers
    get large weights so that no two experts tie for a token."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".gate.weight"):
                p.normal_(0.0, 0.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.fixture(scope="module", params=["llama", "llama3", "llama_biased", "qwen2", "qwen3_window",
                                        "mistral_window", "phi3_window", "gemma2", "gemma3", "mixtral", "qwen3_moe",
                                        "qwen2_moe"])
def model_pair(request, tmp_path_factory):
    torch.manual_seed(zlib.crc32(request.param.encode()))  # hash() of a str changes with PYTHONHASHSEED
    cfg = _hf_config(request.param)
    # Gemma's soft-capped attention runs in transformers' eager attention only.
    eager = {"attn_implementation": "eager"} if request.param.startswith("gemma") else {}
    hf = transformers.AutoModelForCausalLM.from_config(cfg, **eager).eval()
    _perturb_biases_and_norms(hf)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    config = ModelConfig.from_json(path)
    params = load_hf_params(path, config, dtype=jnp.float32)
    return hf, config, params


def _runner(config, params, num_blocks=64):
    return ModelRunner(config, params, num_blocks=num_blocks, block_size=BLOCK, shapes=SHAPES)


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_logits_through_prefill_then_decode(model_pair):
    hf, config, params = model_pair
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, 45).tolist()
    ref = _hf_logits(hf, ids)
    runner = _runner(config, params)
    blocks = [5, 2, 9]  # deliberately out of order
    first = runner.logits([], [SeqChunk(ids[:23], 0, blocks)])[0]
    assert _rel(first, ref[22]) < 1e-3
    for pos in range(23, len(ids)):  # teacher-forced decode steps
        got = runner.logits([SeqChunk([ids[pos]], pos, blocks)], [])[0]
        assert _rel(got, ref[pos]) < 1e-3, pos


@pytest.mark.parametrize("model_pair", ["mixtral", "qwen3_moe"], indirect=True)
def test_moe_logits_through_the_pallas_kernels(model_pair):
    """The experts' grouped GEMM (and attention) as Pallas kernels, in interpret mode: prefill then decode."""
    hf, config, params = model_pair
    ids = np.random.default_rng(1).integers(0, VOCAB, 20).tolist()
    ref = _hf_logits(hf, ids)
    runner = ModelRunner(config, params, num_blocks=64, block_size=BLOCK, kernel_impl="interpret")
    assert _rel(runner.logits([], [SeqChunk(ids[:19], 0, [3, 1])])[0], ref[18]) < 1e-3
    assert _rel(runner.logits([SeqChunk([ids[19]], 19, [3, 1])], [])[0], ref[19]) < 1e-3


def test_logits_through_chunked_prefill(model_pair):
    hf, config, params = model_pair
    ids = np.random.default_rng(1).integers(0, VOCAB, 41).tolist()
    ref = _hf_logits(hf, ids)
    runner = _runner(config, params)
    blocks = [7, 3, 11]
    for start in range(0, len(ids), 7):
        chunk = ids[start:start + 7]
        got = runner.logits([], [SeqChunk(chunk, start, blocks)])[0]
        assert _rel(got, ref[start + len(chunk) - 1]) < 1e-3, start


def _hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("chunk", [None, 5])
def test_greedy_generation_matches(model_pair, chunk):
    hf, config, params = model_pair
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (3, 17, 33)]
    want = [_hf_greedy(hf, p, 24) for p in prompts]
    got = generate(_runner(config, params), prompts, 24, prefill_chunk=chunk)
    assert got == want


def test_greedy_after_prefix_cache_hit(model_pair):
    """A second sequence reuses the first one's two full KV blocks and prefills only its own suffix."""
    hf, config, params = model_pair
    rng = np.random.default_rng(3)
    shared = rng.integers(0, VOCAB, 2 * BLOCK).tolist()
    first = shared + rng.integers(0, VOCAB, 5).tolist()
    second = shared + rng.integers(0, VOCAB, 9).tolist()
    runner = _runner(config, params)
    runner.logits([], [SeqChunk(first, 0, [0, 1, 2])])
    table = [0, 1, 3, 4, 5]  # blocks 0 and 1 hold the shared prefix's K/V
    tokens = list(second)
    cached = 2 * BLOCK
    greedy = GREEDY_ROW
    tok = runner.step([], [SeqChunk(tokens[cached:], cached, table)], [greedy])[0]
    out = [int(tok)]
    cached = len(tokens)
    while len(out) < 24:
        tokens.append(out[-1])
        tok = runner.step([SeqChunk([out[-1]], cached, table)], [], [greedy])[0]
        cached += 1
        out.append(int(tok))
    assert out == _hf_greedy(hf, second, 24)


def test_language_model_of_an_image_text_checkpoint(tmp_path):
    """Mistral 3 nests a Mistral language model under text_config and its weights under language_model.*: the
    language model is served alone and matches the full transformers model on text."""
    torch.manual_seed(4)
    text = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=32, patch_size=16, head_dim=16)
    hf = transformers.Mistral3ForConditionalGeneration(
        transformers.Mistral3Config(text_config=text, vision_config=vision)).eval()
    _perturb_biases_and_norms(hf)
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="language model only"):
        config = ModelConfig.from_json(tmp_path)
    assert config.architecture == "MistralForCausalLM"
    with pytest.warns(UserWarning, match="multi_modal_projector"):  # the vision weights are left unread
        params = load_hf_params(tmp_path, config, dtype=jnp.float32)
    ids = np.random.default_rng(5).integers(0, VOCAB, 20).tolist()
    got = _runner(config, params).logits([], [SeqChunk(ids, 0, [0, 1])])[0]
    assert _rel(got, _hf_logits(hf, ids)[-1]) < 1e-3


def test_gemma3_language_model_of_an_image_text_checkpoint(tmp_path):
    """Gemma 3 4B+ nests a gemma3_text model under text_config and its weights under model.language_model.*;
    transformers' Gemma3ForConditionalGeneration never applies final_logit_softcapping, so neither do we."""
    torch.manual_seed(6)
    text = _hf_config("gemma3")
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=16)
    hf = transformers.Gemma3ForConditionalGeneration(
        transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4),
    ).eval()
    _perturb_biases_and_norms(hf)
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="serving its gemma3_text language model only"):
        with pytest.warns(UserWarning, match="final_logit_softcapping=4.0 is ignored"):
            config = ModelConfig.from_json(tmp_path)
    assert config.architecture == "Gemma3ForCausalLM" and config.final_logit_softcap == 0.0
    with pytest.warns(UserWarning, match="multi_modal_projector"):
        params = load_hf_params(tmp_path, config, dtype=jnp.float32)
    ids = np.random.default_rng(5).integers(0, VOCAB, 20).tolist()
    got = _runner(config, params).logits([], [SeqChunk(ids, 0, [0, 1])])[0]
    assert _rel(got, _hf_logits(hf, ids)[-1]) < 1e-3
