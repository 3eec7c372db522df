"""config.json fields that change the model are implemented or refused by name; nothing is dropped silently."""

import dataclasses
import json
import warnings

import pytest
import transformers

from configs import CONFIGS_DIR
from runner.model.config import ModelConfig

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _saved(config_class, **kwargs) -> dict:
    """The config.json that transformers writes for this config's model."""
    architecture = config_class.__name__.replace("Config", "ForCausalLM")
    return {"architectures": [architecture], **json.loads(config_class(**{**SMALL, **kwargs}).to_json_string())}


def _parse(cfg: dict) -> ModelConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ModelConfig.from_hf_dict(cfg)


@pytest.mark.parametrize("config_class", [transformers.LlamaConfig, transformers.MistralConfig,
                                          transformers.Qwen2Config, transformers.Qwen3Config, transformers.Phi3Config])
def test_configs_saved_by_transformers_parse_without_warnings(config_class):
    windowed = (transformers.MistralConfig, transformers.Phi3Config)
    kwargs = {"sliding_window": None} if config_class in windowed else {}
    config = _parse(_saved(config_class, **kwargs))
    assert config.num_layers == 2 and config.hidden_act == "silu"


def _gemma3(**kwargs) -> dict:
    return {**_saved(transformers.Gemma3TextConfig, **kwargs), "architectures": ["Gemma3ForCausalLM"]}


def test_gemma_options():
    gemma2 = _parse(_saved(transformers.Gemma2Config, num_hidden_layers=3, head_dim=16, sliding_window=32))
    assert gemma2.layer_windows == (32, 0, 32) and gemma2.attn_logit_softcap == 50.0
    assert (gemma2.final_logit_softcap, gemma2.attn_scale, gemma2.rope_local_theta) == (30.0, 256 ** -0.5, 0.0)
    assert gemma2.norm_plus_one and gemma2.sandwich_norm and gemma2.embed_scale and not gemma2.qk_norm
    assert gemma2.hidden_act == "gelu_pytorch_tanh" and gemma2.tie_word_embeddings
    gemma3 = _parse(_gemma3(num_hidden_layers=7, sliding_window=16))
    assert gemma3.layer_windows == (16,) * 5 + (0, 16) and gemma3.qk_norm and gemma3.rope_local_theta == 10000.0
    assert gemma3.rope_theta == 1e6 and gemma3.attn_logit_softcap == 0.0
    with pytest.warns(UserWarning, match="attn_logit_softcapping=3.0 is ignored for Gemma 3"):
        assert ModelConfig.from_hf_dict(_gemma3(attn_logit_softcapping=3.0)).attn_logit_softcap == 0.0
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        ModelConfig.from_hf_dict(_gemma3(use_bidirectional_attention=True))
    # A Gemma 3 image-text config.json (transformers 4.x) keeps only the text fields that differ from the defaults.
    nested = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
              "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                              "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                              "sliding_window": 1024}, "vision_config": {}}
    with pytest.warns(UserWarning, match="serving its gemma3_text language model only"):
        config = ModelConfig.from_hf_dict(nested)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (8, 4, 256, 262208)
    assert dict(config.rope_scaling)["factor"] == 8.0 and config.rope_local_theta == 10000.0
    assert config.layer_windows[4:7] == (1024, 0, 1024) and config.eos_token_ids == (1, 106)


def test_llama_options_become_config_fields():
    config = _parse(_saved(transformers.LlamaConfig, attention_bias=True, mlp_bias=True, hidden_act="gelu"))
    assert (config.qkv_bias, config.o_bias, config.mlp_bias, config.hidden_act) == (True, True, True, "gelu")
    qwen2 = _parse(_saved(transformers.Qwen2Config))
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.qk_norm) == (True, False, False)
    qwen3 = _parse(_saved(transformers.Qwen3Config, head_dim=32))
    assert (qwen3.qkv_bias, qwen3.qk_norm, qwen3.head_dim, qwen3.q_size) == (False, True, 32, 128)


def test_unsupported_activation_is_refused_by_name():
    with pytest.raises(ValueError, match="hidden_act 'relu2'"):
        ModelConfig.from_hf_dict(_saved(transformers.LlamaConfig, hidden_act="relu2"))


def test_sliding_windows_per_layer():
    assert _parse(_saved(transformers.MistralConfig, sliding_window=16)).layer_windows == (16, 16)
    assert _parse(_saved(transformers.MistralConfig, sliding_window=None)).layer_windows == ()
    qwen = _saved(transformers.Qwen2Config, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    config = _parse(qwen)
    assert config.layer_windows == (0, 16) and (config.window(0), config.window(1)) == (0, 16)
    del qwen["layer_types"]  # as transformers 4 wrote it: max_window_layers alone says which layers slide
    assert _parse(qwen).layer_windows == (0, 16)
    # Without use_sliding_window transformers ignores sliding_window and layer_types.
    assert _parse({**qwen, "use_sliding_window": False, "layer_types": ["sliding_attention"] * 2}).layer_windows == ()
    assert _parse(_saved(transformers.Qwen3Config, use_sliding_window=True, sliding_window=16,
                         max_window_layers=2)).layer_windows == ()
    with pytest.raises(ValueError, match="layer_types.*chunked_attention"):
        ModelConfig.from_hf_dict({**qwen, "layer_types": ["full_attention", "chunked_attention"]})
    with pytest.raises(ValueError, match="layer_windows"):
        dataclasses.replace(config, layer_windows=(4,))


def test_partial_rotary_is_refused():
    phi = _saved(transformers.Phi3Config, sliding_window=None)
    phi["rope_parameters"]["partial_rotary_factor"] = 0.75
    with pytest.raises(ValueError, match="partial_rotary_factor=0.75"):
        ModelConfig.from_hf_dict(phi)
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5"):
        ModelConfig.from_hf_dict({**_saved(transformers.Phi3Config, sliding_window=None), "partial_rotary_factor": 0.5})


def test_unknown_fields_are_listed_in_one_warning():
    cfg = {**_saved(transformers.LlamaConfig), "logits_scaling": 4.0, "embedding_multiplier": 12.0,
           "some_null_field": None}
    with pytest.warns(UserWarning) as record:
        ModelConfig.from_hf_dict(cfg)
    assert len(record) == 1
    assert "embedding_multiplier, logits_scaling" in str(record[0].message)
    assert "some_null_field" not in str(record[0].message)
    # A Mistral config does not read mlp_bias (its MLP has none), so it is listed rather than applied.
    with pytest.warns(UserWarning, match="mlp_bias"):
        config = ModelConfig.from_hf_dict({**_saved(transformers.MistralConfig, sliding_window=None), "mlp_bias": True})
    assert not config.mlp_bias


@pytest.mark.parametrize("key", ["quantization_config", "compression_config"])
def test_quantized_checkpoints_are_refused(key):
    cfg = {**_saved(transformers.LlamaConfig), key: {"quant_method": "awq", "bits": 4}}
    with pytest.raises(ValueError, match="quantized checkpoints are not supported.*'awq'"):
        ModelConfig.from_hf_dict(cfg)


def test_nested_text_config():
    llama4 = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
              "text_config": {"model_type": "llama4_text", "hidden_size": 64}, "vision_config": {}}
    with pytest.raises(ValueError, match="text_config.*'llama4_text'.*not supported.*images, audio.*not served"):
        ModelConfig.from_hf_dict(llama4)
    llava = {"architectures": ["LlavaForConditionalGeneration"], "eos_token_id": 7, "tie_word_embeddings": False,
             "text_config": {**_saved(transformers.Qwen2Config), "eos_token_id": None}, "vision_config": {}}
    with pytest.warns(UserWarning, match="LlavaForConditionalGeneration: serving its qwen2 language model only"):
        config = ModelConfig.from_hf_dict(llava)
    assert config.architecture == "Qwen2ForCausalLM" and config.eos_token_ids == (7,)
    with pytest.raises(ValueError, match="quantized"):
        ModelConfig.from_hf_dict({**llava, "text_config": {**llava["text_config"], "quantization_config": {}}})


def test_missing_required_field_is_named():
    cfg = _saved(transformers.LlamaConfig)
    del cfg["num_attention_heads"]
    with pytest.raises(ValueError, match="no 'num_attention_heads'"):
        ModelConfig.from_hf_dict(cfg)


def test_rope_scaling_types():
    for rope_type in ("dynamic", "longrope"):  # what each needs is named
        with pytest.raises(ValueError, match=f"'{rope_type}' needs a"):
            ModelConfig.from_hf_dict({**_saved(transformers.LlamaConfig), "rope_scaling": {"rope_type": rope_type}})
    with pytest.raises(ValueError, match="rope_scaling type 'su'"):
        ModelConfig.from_hf_dict({**_saved(transformers.LlamaConfig), "rope_scaling": {"type": "su", "factor": 2.0}})
    # Old Phi-3 configs spell longrope "su" or "yarn"; transformers reads them as longrope.
    phi = {**_saved(transformers.Phi3Config, sliding_window=None), "max_position_embeddings": 1024,
           "original_max_position_embeddings": 256,
           "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}
    with pytest.warns(UserWarning, match="longrope.*served up to original_max_position_embeddings"):
        config = ModelConfig.from_hf_dict(phi)
    assert dict(config.rope_scaling)["rope_type"] == "longrope" and config.max_position_embeddings == 256
    with pytest.raises(ValueError, match="long_factor must hold head_dim / 2 = 8"):
        ModelConfig.from_hf_dict({**phi, "rope_scaling": {**phi["rope_scaling"], "long_factor": [2.0] * 3}})
    # Missing original context lengths default to max_position_embeddings, and YaRN's factor to their ratio.
    yarn = _parse({**_saved(transformers.Qwen3Config, max_position_embeddings=4096),
                   "rope_scaling": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 1024}})
    assert dict(yarn.rope_scaling)["factor"] == 4.0
    llama3 = _parse({**_saved(transformers.LlamaConfig, max_position_embeddings=2048),
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    assert dict(llama3.rope_scaling)["original_max_position_embeddings"] == 2048


def test_presets_parse_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qwen3 = ModelConfig.preset("qwen3-8b")
        for path in CONFIGS_DIR.glob("*.json"):
            ModelConfig.preset(path.stem)
    assert qwen3.qk_norm and qwen3.head_dim == 128 and round(qwen3.num_params() / 1e9, 1) == 8.2
    moe = ModelConfig.preset("qwen3-30b-a3b")
    assert (moe.num_experts, moe.num_experts_per_tok, moe.norm_topk_prob) == (128, 8, True)
    assert round(moe.num_params() / 1e9, 1) == 30.5  # "30B", as Qwen's model card says 30.5B in all
    mixtral = ModelConfig.preset("mixtral-8x7b")
    assert round(mixtral.num_params() / 1e9, 1) == 46.7 and mixtral.norm_topk_prob  # Mistral's 46.7B
    gemma = ModelConfig.preset("gemma-3-12b")
    assert gemma.layer_windows[:6] == (1024,) * 5 + (0,) and gemma.rope_local_theta == 10000.0
    assert dict(gemma.rope_scaling)["factor"] == 8.0 and gemma.sandwich_norm and gemma.qk_norm
    assert round(gemma.num_params() / 1e9, 1) == 11.8  # the language model of Gemma 3 12B
