"""RoPE frequencies of every rope_scaling type against transformers' own functions, including the regimes the
tiny-model tests in test_model_hf.py do not reach (longrope's long factors, dynamic NTK far past the context)."""

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from runner.model.config import ModelConfig
from runner.model.rope import _token_inv_freq, rope_attention_factor

HEAD_DIM = 16


def _configs(config_class, **kwargs):
    hf = config_class(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, **kwargs)
    saved = {"architectures": [config_class.__name__.replace("Config", "ForCausalLM")],
             **json.loads(hf.to_json_string())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf, ModelConfig.from_hf_dict(saved)


def _hf(hf, rope_type, seq_len=None):
    inv, factor = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu", seq_len=seq_len)
    return inv.numpy(), factor


def test_longrope_short_and_long_factors():
    rng = np.random.default_rng(0)
    short, long = rng.uniform(1, 5, (2, HEAD_DIM // 2)).tolist()
    hf, config = _configs(transformers.Phi3Config, max_position_embeddings=4096, original_max_position_embeddings=256,
                          rope_scaling={"rope_type": "longrope", "short_factor": short, "long_factor": long})
    assert config.max_position_embeddings == 256  # served up to the original context (see hf_config)
    got = np.asarray(_token_inv_freq(config, jnp.asarray([0, 255, 256, 3000])))
    for row, seq_len in zip(got, (1, 256, 257, 3001)):
        want, factor = _hf(hf, "longrope", seq_len)
        np.testing.assert_allclose(row, want, rtol=1e-6)
    assert rope_attention_factor(config) == pytest.approx(factor)  # from 4096 / 256


def test_dynamic_ntk_per_position():
    hf, config = _configs(transformers.LlamaConfig, max_position_embeddings=128,
                          rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    assert config.max_position_embeddings == 512  # stretched by the factor
    positions = [0, 127, 128, 300, 511]
    got = np.asarray(_token_inv_freq(config, jnp.asarray(positions)))
    for row, pos in zip(got, positions):
        want, factor = _hf(hf, "dynamic", pos + 1)
        np.testing.assert_allclose(row, want, rtol=1e-5)
    assert rope_attention_factor(config) == factor == 1.0


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 3.0},
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_fixed_types(scaling):
    hf, config = _configs(transformers.LlamaConfig, max_position_embeddings=512, rope_scaling=scaling)
    want, factor = _hf(hf, scaling["rope_type"])
    np.testing.assert_allclose(np.asarray(_token_inv_freq(config, jnp.asarray([5])))[0], want, rtol=1e-6)
    assert rope_attention_factor(config) == pytest.approx(factor)
