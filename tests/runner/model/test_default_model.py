"""The embedded default checkpoint: deterministic, complete, loadable by transformers, safe to create concurrently."""

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from nexus_jax.testing.paths import REPO_ROOT
from runner.model import default_model
from runner.model.config import ModelConfig
from runner.model.default_model import FILES, MODEL_VERSION, cache_root, default_model_dir


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEXUS_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        return default_model_dir()


@pytest.fixture(scope="module")
def reference_hashes(model_dir):
    return file_hashes(model_dir)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("NEXUS_JAX_CACHE", str(tmp_path / "c"))
    assert default_model_dir() == tmp_path / "c" / MODEL_VERSION
    monkeypatch.delenv("NEXUS_JAX_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "nexus_jax"


def test_deterministic_across_builds_and_processes(model_dir, reference_hashes, monkeypatch, tmp_path):
    assert sorted(reference_hashes) == sorted(FILES)
    monkeypatch.setenv("NEXUS_JAX_CACHE", str(tmp_path / "again"))
    assert file_hashes(default_model_dir()) == reference_hashes
    # A fresh interpreter with another hash seed must produce the same bytes (no dict/set order leaks in).
    env = {**os.environ, "NEXUS_JAX_CACHE": str(tmp_path / "subprocess"), "PYTHONHASHSEED": "12345"}
    code = "from runner.model.default_model import default_model_dir as d; print(d())"
    out = subprocess.run([sys.executable, "-c", code],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True)
    assert file_hashes(Path(out.stdout.strip())) == reference_hashes


def test_config_matches_tiny_preset(model_dir):
    assert ModelConfig.from_json(model_dir) == ModelConfig.preset("tiny")


def test_weights_have_hf_llama_names_and_shapes(model_dir):
    cfg = ModelConfig.preset("tiny")
    weights = load_file(str(model_dir / "model.safetensors"))
    h, i, v, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.q_size, cfg.kv_size
    expected = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        expected.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    assert {name: w.shape for name, w in weights.items()} == expected
    assert all(w.dtype == np.float32 for w in weights.values())
    assert sum(w.size for w in weights.values()) == cfg.num_params()
    norm = weights["model.layers.0.input_layernorm.weight"]
    assert 0.0 < np.abs(norm - 1).max() < 1.0
    # Distinct tensors must not repeat the same random draw.
    assert not np.allclose(weights["model.layers.0.self_attn.q_proj.weight"],
                           weights["model.layers.1.self_attn.q_proj.weight"])
    assert 0.01 < weights["lm_head.weight"].std() < 0.04


def test_tokenizer_files(model_dir):
    from nexus_jax.core.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    assert tok.vocab_size == 512
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_ids) == (0, 1, (2,))
    assert tok.encode("hello")[0] == 1
    assert tok.encode("hello", add_special_tokens=False)[0] != 1
    # Merges learned from the embedded English text make common words short.
    assert len(tok.encode(" the", add_special_tokens=False)) == 1


def test_transformers_loads_and_runs(model_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    ids = hf_tok("The scheduler reads a prompt.")["input_ids"]
    assert ids[0] == 1
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 512)
    assert torch.isfinite(logits).all()
    assert logits[0, -1].std() > 0.05  # random weights still give distinguishable next-token scores


def build_in_subprocess(cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c",
                             "from runner.model.default_model import default_model_dir as d; print(d())"],
                            cwd=REPO_ROOT, env={**os.environ, "NEXUS_JAX_CACHE": str(cache)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_creation(reference_hashes, monkeypatch, tmp_path):
    cache = tmp_path / "shared"
    monkeypatch.setenv("NEXUS_JAX_CACHE", str(cache))
    procs = [build_in_subprocess(cache) for _ in range(3)]
    results, errors, builds = [], [], []
    real_write = default_model.write_default_model
    monkeypatch.setattr(default_model, "write_default_model", lambda out: builds.append(out) or real_write(out))

    def build() -> None:
        try:
            results.append(default_model_dir())
        except Exception as e:  # collected so the assertion below names it
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outputs = [p.communicate(timeout=60) for p in procs]
    assert not errors
    assert len(builds) >= 2  # the threads really raced to install
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    paths = {str(r) for r in results} | {out.strip() for out, _ in outputs}
    assert paths == {str(cache / MODEL_VERSION)}
    assert file_hashes(cache / MODEL_VERSION) == reference_hashes
    assert [p.name for p in cache.iterdir()] == [MODEL_VERSION]  # no temp or stale folders left behind


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_incomplete_folder_is_rebuilt(reference_hashes, monkeypatch, tmp_path, damage):
    monkeypatch.setenv("NEXUS_JAX_CACHE", str(tmp_path))
    target = default_model_dir()
    victim = target / "model.safetensors"
    if damage == "delete":
        victim.unlink()
    else:
        victim.write_bytes(b"")
    (target / "leftover.tmp").write_text("partial")
    assert default_model_dir() == target
    assert file_hashes(target) == reference_hashes
    assert [p.name for p in tmp_path.iterdir()] == [MODEL_VERSION]


def test_complete_folder_is_reused_not_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("NEXUS_JAX_CACHE", str(tmp_path))
    default_model_dir()
    monkeypatch.setattr(default_model, "write_default_model",
                        lambda out_dir: pytest.fail("rebuilt a complete checkpoint"))
    assert default_model_dir() == tmp_path / MODEL_VERSION


def test_losing_the_race_keeps_the_winner(monkeypatch, tmp_path):
    monkeypatch.setenv("NEXUS_JAX_CACHE", str(tmp_path))
    target = tmp_path / MODEL_VERSION
    real_write = default_model.write_default_model

    def write_while_another_creator_finishes_first(out_dir):
        monkeypatch.setattr(default_model, "write_default_model", real_write)
        assert default_model_dir() == target
        (target / "winner").write_text("")
        real_write(out_dir)

    monkeypatch.setattr(default_model, "write_default_model", write_while_another_creator_finishes_first)
    assert default_model_dir() == target
    assert (target / "winner").exists()  # the complete folder already there was not replaced
    assert [p.name for p in tmp_path.iterdir()] == [MODEL_VERSION]
