"""Checkpoint loading against tiny random Hugging Face models saved by transformers on CPU."""

import dataclasses
import json
import shutil
import tracemalloc
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from runner.model import checkpoint
from runner.model.checkpoint import (
    load_hf_params,
    load_params,
    param_shapes,
    random_params,
    restore_params,
    save_params,
)
from runner.model.config import ModelConfig
from runner.model.safetensors_io import SafetensorsFile

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def _save(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path, {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (directory, HF state dict as float32 numpy)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**SMALL, head_dim=16))
    qwen = Qwen2ForCausalLM(Qwen2Config(**SMALL))
    tied = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=True))
    biased = LlamaForCausalLM(LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True))
    qwen3 = Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=32, attention_bias=True))
    out = {"llama": _save(llama, root / "llama"),
           "sharded": _save(llama, root / "sharded", max_shard_size="40KB"),
           "qwen": _save(qwen, root / "qwen"),
           "tied": _save(tied, root / "tied"),
           "biased": _save(biased, root / "biased"),
           "qwen3": _save(qwen3, root / "qwen3")}
    out["bf16"] = _save(llama.to(torch.bfloat16), root / "bf16")
    return out


def _expected(sd, config):
    """The contract layout built independently from the HF state dict."""
    def layer_stack(fn):
        return np.stack([fn(f"model.layers.{i}.") for i in range(config.num_layers)])

    attn = "self_attn."
    layers = {
        "attn_norm": layer_stack(lambda p: sd[p + "input_layernorm.weight"]),
        "qkv": layer_stack(lambda p: np.concatenate([sd[p + attn + f"{x}_proj.weight"].T for x in "qkv"], axis=1)),
        "o": layer_stack(lambda p: sd[p + attn + "o_proj.weight"].T),
        "mlp_norm": layer_stack(lambda p: sd[p + "post_attention_layernorm.weight"]),
        "gate_up": layer_stack(lambda p: np.concatenate([sd[p + "mlp.gate_proj.weight"].T,
                                                          sd[p + "mlp.up_proj.weight"].T], axis=1)),
        "down": layer_stack(lambda p: sd[p + "mlp.down_proj.weight"].T),
    }
    if config.qkv_bias:
        layers["qkv_bias"] = layer_stack(lambda p: np.concatenate([sd[p + attn + f"{x}_proj.bias"] for x in "qkv"]))
    if config.o_bias:
        layers["o_bias"] = layer_stack(lambda p: sd[p + attn + "o_proj.bias"])
    if config.mlp_bias:
        layers["gate_up_bias"] = layer_stack(lambda p: np.concatenate([sd[p + "mlp.gate_proj.bias"],
                                                                       sd[p + "mlp.up_proj.bias"]]))
        layers["down_bias"] = layer_stack(lambda p: sd[p + "mlp.down_proj.bias"])
    if config.qk_norm:
        layers["q_norm"] = layer_stack(lambda p: sd[p + attn + "q_norm.weight"])
        layers["k_norm"] = layer_stack(lambda p: sd[p + attn + "k_norm.weight"])
    out = {"embed": sd["model.embed_tokens.weight"], "layers": layers, "final_norm": sd["model.norm.weight"]}
    if not config.tie_word_embeddings:
        out["lm_head"] = sd["lm_head.weight"].T
    return out


def _assert_params_equal(params, expected):
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got, np.float32), want)


@pytest.mark.parametrize("name", ["llama", "sharded", "qwen", "tied", "bf16", "biased", "qwen3"])
def test_load_matches_hf_tensors(models, name):
    path, sd = models[name]
    config = ModelConfig.from_json(path)
    assert config.qkv_bias == (name in ("qwen", "biased", "qwen3")) and config.tie_word_embeddings == (name == "tied")
    assert config.o_bias == (name in ("biased", "qwen3")) and config.mlp_bias == (name == "biased")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params = load_hf_params(path, config, jnp.float32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    _assert_params_equal(params, _expected(sd, config))


def test_sharded_checkpoint_has_an_index(models):
    path, _ = models["sharded"]
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("model-*.safetensors"))) > 2


def test_default_dtype_is_bf16_and_config_defaults_to_the_directory(models):
    path, sd = models["llama"]
    params = load_hf_params(path)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    want = sd["model.layers.1.self_attn.o_proj.weight"].T.astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(params["layers"]["o"][1]), want)


def test_raw_reader(models, tmp_path):
    path, sd = models["bf16"]
    st = SafetensorsFile(path / "model.safetensors")
    info = st.tensors["model.embed_tokens.weight"]
    assert info.dtype == "BF16" and info.shape == (256, 64)
    np.testing.assert_array_equal(st.read("model.embed_tokens.weight").astype(np.float32),
                                  sd["model.embed_tokens.weight"])
    st.close()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((path / "model.safetensors").read_bytes()[:-10])
    with pytest.raises(ValueError, match="outside the file"):
        SafetensorsFile(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="header length"):
        SafetensorsFile(garbage)


def _copy(src, dst, edit=None):
    """Copy a single-file checkpoint; `edit` may change its tensor dict before it is written back."""
    shutil.copytree(src, dst)
    if edit:
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_paths_raise_file_not_found(models, tmp_path):
    llama, _ = models["llama"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_hf_params(tmp_path / "nowhere", None)
    no_config = _copy(llama, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_params(no_config)
    no_weights = _copy(llama, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf_params(no_weights)
    missing_shard = tmp_path / "missing_shard"
    shutil.copytree(models["sharded"][0], missing_shard)
    (missing_shard / "model-00002-of-00012.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00012.safetensors"):
        load_hf_params(missing_shard)


def test_unknown_architecture(models, tmp_path):
    path = _copy(models["llama"][0], tmp_path / "gpt2")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_hf_params(path)


def test_bad_tensors(models, tmp_path):
    llama, _ = models["llama"]
    name = "model.layers.1.mlp.up_proj.weight"

    def shrink(t):
        t[name] = t[name][:100]
    with pytest.raises(ValueError, match=rf"{name}.*\(100, 64\).*\(128, 64\)"):
        load_hf_params(_copy(llama, tmp_path / "shape", shrink))

    def to_int(t):
        t[name] = t[name].astype(np.int32)
    with pytest.raises(ValueError, match=rf"{name}.*I32"):
        load_hf_params(_copy(llama, tmp_path / "dtype", to_int))

    def drop(t):
        del t[name], t["model.norm.weight"]
    with pytest.raises(ValueError, match="missing 2 required tensors") as excinfo:
        load_hf_params(_copy(llama, tmp_path / "missing", drop))
    assert name in str(excinfo.value) and "model.norm.weight" in str(excinfo.value)


def test_extra_tensors_warn_and_known_buffers_are_ignored(models, tmp_path):
    llama, sd = models["llama"]

    def add(t):
        t["model.extra.weight"] = np.ones(3, np.float32)
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    with pytest.warns(UserWarning, match="model.extra.weight") as record:
        params = load_hf_params(_copy(llama, tmp_path / "extra", add), dtype=jnp.float32)
    assert not any("inv_freq" in str(w.message) for w in record)
    _assert_params_equal(params, _expected(sd, ModelConfig.from_json(llama)))

    tied, tied_sd = models["tied"]

    def add_head(t):
        t["lm_head.weight"] = np.zeros_like(t["model.embed_tokens.weight"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params = load_hf_params(_copy(tied, tmp_path / "tied_head", add_head), dtype=jnp.float32)
    assert "lm_head" not in params
    np.testing.assert_array_equal(params["embed"], tied_sd["model.embed_tokens.weight"])


def test_save_restore_round_trip(models, tmp_path):
    path, sd = models["qwen"]
    config = ModelConfig.from_json(path)
    params = load_hf_params(path, config, jnp.float32)
    save_params(params, tmp_path / "cache", config)
    _assert_params_equal(restore_params(tmp_path / "cache", config, jnp.float32), _expected(sd, config))
    as_bf16 = restore_params(tmp_path / "cache", config, jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(as_bf16))
    np.testing.assert_array_equal(as_bf16["layers"]["qkv_bias"], params["layers"]["qkv_bias"].astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="rope_theta"):
        restore_params(tmp_path / "cache", dataclasses.replace(config, rope_theta=1.0), jnp.float32)
    with pytest.raises(FileNotFoundError):
        restore_params(tmp_path / "nothing", config)


def test_load_params_uses_the_cache(models, tmp_path, monkeypatch):
    path, sd = models["llama"]
    config = ModelConfig.from_json(path)
    first = load_params(path, config, jnp.float32, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1

    def no_hf(*args):
        raise AssertionError("the cache should have been used")
    monkeypatch.setattr(checkpoint, "load_hf_params", no_hf)
    _assert_params_equal(load_params(path, config, jnp.float32, cache_dir=tmp_path), _expected(sd, config))
    # Another dtype is another entry, converted from the HF files.
    with pytest.raises(AssertionError, match="cache"):
        load_params(path, config, jnp.bfloat16, cache_dir=tmp_path)
    assert first["embed"].dtype == jnp.float32


def test_peak_host_memory_is_about_one_tensor(tmp_path):
    # 8 layers of 1 MiB MLP matrices: ~34 MiB of float32 weights, no tensor above 1 MiB.
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=1024,
                                         num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(tmp_path)
    sizes = [t.numel() * 4 for t in model.state_dict().values()]
    largest, total = max(sizes), sum(sizes)
    del model
    load_hf_params(tmp_path, dtype=jnp.float32)  # compile the writers outside the measurement
    tracemalloc.start()
    try:
        params = load_hf_params(tmp_path, dtype=jnp.float32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(x.nbytes for x in jax.tree.leaves(params)) == total
    assert peak < 3 * largest + (1 << 20) < total / 6, (peak, largest, total)


@pytest.mark.parametrize("tied", [False, True])
def test_random_params_layout(tied):
    config = dataclasses.replace(ModelConfig.preset("tiny"), tie_word_embeddings=tied, qkv_bias=tied)
    params = random_params(config, jnp.bfloat16, seed=1)
    shapes = jax.tree.map(lambda x: x.shape, params)
    assert shapes == param_shapes(config)
    assert ("lm_head" in params) != tied and ("qkv_bias" in params["layers"]) == tied
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    qkv = np.asarray(params["layers"]["qkv"], np.float32)
    assert abs(qkv.std() - 0.02) < 0.002 and abs(qkv.mean()) < 0.002
    norms = np.asarray(params["layers"]["attn_norm"], np.float32)
    assert abs(norms.mean() - 1) < 0.01 and norms.std() > 0
    again = random_params(config, jnp.bfloat16, seed=1)
    other = random_params(config, jnp.bfloat16, seed=2)
    np.testing.assert_array_equal(again["embed"], params["embed"])
    assert not np.array_equal(other["embed"], params["embed"])
