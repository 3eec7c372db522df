"""A real 128k-token byte-level BPE vocabulary for benchmarks on presets, which carry no tokenizer.

Structured output's host cost (xgrammar's mask filling and accept_token) depends on the vocabulary: the embedded
model's 512 tokens make it look cheaper than serving Llama 3 or Mistral would. The mistral-common wheel (Apache-2.0,
on PyPI) ships Mistral's Tekken vocabulary (tiktoken format: byte strings by rank); this converts its first
`vocab_size` ids into a Hugging Face tokenizer.json (byte-level BPE, merges derived from the ranks) that
nexus_jax's Tokenizer loads like any checkpoint's.

  python3 benchmarks/wide_tokenizer.py TEKKEN_JSON OUT_DIR [--vocab-size 128256]

benchmarks/device_wheels.sh fetch runs it into wheels/tekken-tokenizer (the GPU machine has no registry).
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

# Tekken reserves its first ids for control tokens; these three have names the chat formats use.
NAMED_SPECIAL = {0: "<unk>", 1: "<s>", 2: "</s>"}


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def merges_from_ranks(ranked: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Every split of each token into two lower-ranked tokens, ordered by the merged token's rank: the merge
    list a BPE trained to these ranks would have (how transformers converts tiktoken vocabularies)."""
    rank = {token: i for i, token in enumerate(ranked)}
    merges = []
    for i, token in enumerate(ranked):
        splits = [(rank[token[:k]], rank[token[k:]], token[:k], token[k:]) for k in range(1, len(token))
                  if rank.get(token[:k], i) < i and rank.get(token[k:], i) < i]
        merges += [(left, right) for _, _, left, right in sorted(splits)]
    return merges


def build(tekken_json: Path, out_dir: Path, vocab_size: int) -> Path:
    data = json.loads(Path(tekken_json).read_text())
    num_special = data["config"]["default_num_special_tokens"]
    ranked = [base64.b64decode(t["token_bytes"]) for t in data["vocab"][:vocab_size - num_special]]
    to_text = byte_to_unicode()
    text = lambda token: "".join(to_text[b] for b in token)  # noqa: E731
    vocab = {text(token): num_special + i for i, token in enumerate(ranked)}
    specials = [{"id": i, "content": NAMED_SPECIAL.get(i, f"<SPECIAL_{i}>"), "single_word": False,
                 "lstrip": False, "rstrip": False, "normalized": False, "special": True} for i in range(num_special)]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": specials, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": data["config"]["pattern"]}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {**{s["content"]: s["id"] for s in specials}, **vocab},
                  "merges": [[text(a), text(b)] for a, b in merges_from_ranks(ranked)]}}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tekken_json", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--vocab-size", type=int, default=128256, help="the model's (Llama 3's by default)")
    args = ap.parse_args(argv)
    print(build(args.tekken_json, args.out_dir, args.vocab_size))


if __name__ == "__main__":
    main()
