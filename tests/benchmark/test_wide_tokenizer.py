"""wide_tokenizer turns a Tekken-format vocabulary (tiktoken ranks) into a tokenizer.json that nexus_jax loads: checked
on a small hand-made vocabulary (the real one comes from the mistral-common wheel, which CI does not install)."""

import base64
import json

from benchmarks import wide_tokenizer
from nexus_jax.core.tokenizer import Tokenizer

SPECIAL = 4
MERGED = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"wor"]  # "wor" ranks after " wor"


def _tekken(path):
    ranked = [bytes([b]) for b in range(256)] + MERGED
    vocab = [{"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": None} for i, t in enumerate(ranked)]
    config = {"pattern": r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+",
              "default_num_special_tokens": SPECIAL}
    path.write_text(json.dumps({"config": config, "vocab": vocab}))
    return path


def test_merges_follow_the_ranks():
    ranked = [bytes([b]) for b in range(256)] + MERGED
    merges = wide_tokenizer.merges_from_ranks(ranked)
    assert merges[:2] == [(b"h", b"e"), (b"l", b"l")]
    assert (b"he", b"ll") in merges and (b"hell", b"o") in merges and (b"o", b"r") in merges
    assert merges.index((b" w", b"or")) > merges.index((b"o", b"r"))  # " wor" is made after "or"
    assert (b" ", b"wor") not in merges  # "wor" does not exist yet when " wor" is made


def test_the_built_tokenizer_encodes_by_the_merges_and_round_trips(tmp_path):
    out = wide_tokenizer.build(_tekken(tmp_path / "tekken.json"), tmp_path / "tok", vocab_size=SPECIAL + 256 + 6)
    tok = Tokenizer.from_dir(out)
    assert len(tok) == SPECIAL + 256 + 6 and tok.eos_token_ids == (2,) and tok.bos_token_id == 1
    ids = tok.encode("hello world", add_special_tokens=False)
    hello = SPECIAL + 256 + MERGED.index(b"hello")
    assert ids[0] == hello and ids[1] == SPECIAL + 256 + MERGED.index(b" w")  # " wor" is past vocab_size
    text = "hello world, émoji 🚀 {\"a\": 1}"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
