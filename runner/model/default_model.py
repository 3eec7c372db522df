"""The embedded default model: a tiny Llama checkpoint built offline, deterministically, on first use.

`default_model_dir()` returns a Hugging Face style directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json) with the shape of `configs/tiny.json`. Nothing is downloaded:
the weights come from a seeded numpy generator and the byte-level BPE tokenizer is learned from a short text
embedded below, so every machine builds byte-identical files. The weights are random, so the text the model
generates is gibberish; the checkpoint exists to exercise the whole serving path (and to compare against
transformers, which loads it too), not to say anything useful.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from runner.model.config import CONFIGS_DIR

# Bump when anything written below changes, so stale caches are never reused.
MODEL_VERSION = "tiny-llama-v1"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SEED = 20240611

# The rendered prompt starts with <s>; encode it with add_special_tokens=False (as transformers does for chats).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Text the BPE merges are learned from; any fixed text works, English just makes the merges look familiar.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still be a useful test of a large system.
When the server receives a request, it reads the prompt, turns the text into tokens, and puts the request in
a queue. The scheduler looks at the queue and at the memory that is free, then decides which requests run in
the next step. Each step either reads a long prompt in chunks or produces one new token for every running
request. The tokens are turned back into text and streamed to the user as soon as they are ready.
Memory for the keys and values of attention is kept in blocks of the same size. A request that shares its
first words with an earlier one can reuse the blocks that were already computed, which saves time and
energy. When memory runs out, the newest requests are paused and their blocks are given back to the pool.
Programs that call the model many times are treated as one unit, so that a long program does not starve
the short ones that arrive after it. The time that each program has used so far decides its priority, and
a program that has waited for too long is moved to the front of the queue again.
Hello! How are you today? I am fine, thank you. What is the weather like where you are? It is sunny and
warm here, with a light wind from the sea. Would you like to go for a walk in the park this afternoon?
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 2024 appear in text, and so do symbols like
(a + b) * c = d, x[i] = y{j}; "quotes", 'single quotes', and a path: /home/user/data/file.txt.
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))
"""


def cache_root() -> Path:
    """Where built checkpoints live: `$NEXUS_JAX_CACHE` if set, else `~/.cache/nexus_jax`."""
    env = os.environ.get("NEXUS_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nexus_jax"


def default_model_dir() -> Path:
    """Return the directory of the embedded default model, building it on first use."""
    root = cache_root()
    target = root / MODEL_VERSION
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_VERSION}-building-", dir=root))
    try:
        write_default_model(tmp)
        _install(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_default_model(out_dir: Path) -> None:
    """Write every file of the default checkpoint into `out_dir` (which must exist)."""
    out_dir = Path(out_dir)
    config = _hf_config()
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json",
                {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID})
    _write_json(out_dir / "tokenizer.json", _tokenizer_json(config["vocab_size"]))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    # Fixed metadata and safetensors' sorted header make the file byte-identical across runs.
    save_file(_weights(config), str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() and (path / name).stat().st_size > 0 for name in FILES)


def _install(tmp: Path, target: Path) -> None:
    # rename() is atomic, so readers see either no directory or a complete one. It fails when `target` is a
    # non-empty directory: either a concurrent creator won (fine) or a damaged leftover that we move aside.
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if _is_complete(target):
            return
    stale = target.with_name(f".{MODEL_VERSION}-stale-{uuid.uuid4().hex}")
    try:
        os.rename(target, stale)
    except FileNotFoundError:
        pass
    shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if not _is_complete(target):
            raise


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _hf_config() -> dict:
    config = json.loads((CONFIGS_DIR / "tiny.json").read_text())
    config.update({
        "model_type": "llama", "hidden_act": "silu", "torch_dtype": "float32", "dtype": "float32",
        "pad_token_id": PAD_ID, "initializer_range": 0.02, "use_cache": True, "pretraining_tp": 1,
        "attention_dropout": 0.0, "mlp_bias": False, "rope_scaling": None,
    })
    return config


def _weights(config: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config["head_dim"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim

    def linear(out_features: int, in_features: int) -> np.ndarray:
        return (rng.standard_normal((out_features, in_features), dtype=np.float32) * 0.02).astype(np.float32)

    def norm() -> np.ndarray:
        # Not all ones, so that a model that forgets to apply a norm weight gives different logits.
        return (1.0 + 0.1 * rng.standard_normal(h, dtype=np.float32)).astype(np.float32)

    weights = {"model.embed_tokens.weight": linear(vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = norm()
        weights[p + "self_attn.q_proj.weight"] = linear(q_out, h)
        weights[p + "self_attn.k_proj.weight"] = linear(kv_out, h)
        weights[p + "self_attn.v_proj.weight"] = linear(kv_out, h)
        weights[p + "self_attn.o_proj.weight"] = linear(h, q_out)
        weights[p + "post_attention_layernorm.weight"] = norm()
        weights[p + "mlp.gate_proj.weight"] = linear(inter, h)
        weights[p + "mlp.up_proj.weight"] = linear(inter, h)
        weights[p + "mlp.down_proj.weight"] = linear(h, inter)
    weights["model.norm.weight"] = norm()
    weights["lm_head.weight"] = linear(vocab, h)
    return weights


def _byte_to_char() -> dict[int, str]:
    # GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map to code points >= 256,
    # so every byte becomes one visible character that BPE can merge.
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in kept:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _learn_merges(num_tokens: int) -> tuple[dict[str, int], list[list[str]]]:
    """Byte-level BPE on CORPUS until the vocabulary has `num_tokens` entries (ties broken by pair order)."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for char in _byte_to_char().values():
        vocab[char] = len(vocab)
    pieces = ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str(CORPUS)
    words = collections.Counter(tuple(piece) for piece, _ in pieces)
    merges = []
    while len(vocab) < num_tokens:
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            raise RuntimeError("embedded corpus too small for the requested vocabulary size")
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(list(best))
        vocab.setdefault(best[0] + best[1], len(vocab))
        words = collections.Counter({_merge(word, best): count for word, count in words.items()})
    return vocab, merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _tokenizer_json(vocab_size: int) -> dict:
    # Written as plain JSON (not through tokenizers' serializer) so the bytes do not depend on its version.
    vocab, merges = _learn_merges(vocab_size)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, tok in enumerate(SPECIAL_TOKENS)
        ],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS_ID], "tokens": ["<s>"]}},
        },
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": merges,
        },
    }


def _tokenizer_config() -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, tok in enumerate(SPECIAL_TOKENS)
        },
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
