"""Tokenizer: agreement with transformers on several tokenizer styles, chat templates, streaming detokenization."""

import json
import unicodedata
from pathlib import Path

import jinja2
import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from nexus_jax.core.tokenizer import IncrementalDetokenizer, Tokenizer
from runner.model.default_model import CORPUS, default_model_dir

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
STYLES = ("default", "llama3", "qwen2", "llama2", "metaspace")
SAMPLES = ["Hello world!", "  leading and trailing  ", "中文 text, émoji 🙂🎉 and e\u0301 combining",
           "line one\nline two\r\n\ttabbed", "<|user|>hi<|end|> <s></s> <|im_start|>x", "", "12345 ab'c's"]
# A pre-tokenizer split in the style of newer byte-level models (digits in groups of up to three).
SPLIT = r"'(?:s|t|re|ve|m|ll|d)| ?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

HEADER_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% generation %}{{ m['content'] }}{% endgeneration %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATML_TOOLS_TEMPLATE = (
    "<|im_start|>system\nTools: {{ tools | tojson }}\nDate: {{ strftime_now('%Y-%m') }}<|im_end|>\n" + CHATML_TEMPLATE)
INST_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% endif %}"
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + (system + '\n\n' if system is defined and loop.first "
    "else '') + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}")


def save_dir(path: Path, backend: tokenizers.Tokenizer, tokenizer_config: dict, generation_config=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer_config}))
    if generation_config:
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    return path


def byte_level_backend(default_dir: Path, specials: list[str]) -> tokenizers.Tokenizer:
    """The default model's byte-level vocabulary with another model family's special tokens and split regex."""
    spec = json.loads((default_dir / "tokenizer.json").read_text())
    renamed = dict(zip([t["content"] for t in spec["added_tokens"]], specials))
    spec["model"]["vocab"] = {renamed.get(tok, tok): i for tok, i in spec["model"]["vocab"].items()}
    for token in spec["added_tokens"]:
        token["content"] = renamed[token["content"]]
    spec["post_processor"] = None
    backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return backend


def sentencepiece_backend(metaspace: bool) -> tokenizers.Tokenizer:
    """BPE with byte fallback and '▁' for spaces, as in Llama 2 (normalizer + Strip) or Mistral (Metaspace)."""
    trained = tokenizers.Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    trained.train_from_iterator(CORPUS.splitlines(), trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    backend = tokenizers.Tokenizer(models.BPE(vocab, [tuple(m) for m in learned["merges"]], unk_token="<unk>",
                                              byte_fallback=True, fuse_unk=True))
    if metaspace:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence([decoders.Metaspace(prepend_scheme="first", split=False),
                                             decoders.ByteFallback(), decoders.Fuse()])
    else:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in ("<unk>", "<s>", "</s>")])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return backend


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEXUS_JAX_CACHE", str(root / "cache"))
        default = default_model_dir()
    llama3 = byte_level_backend(default, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                          "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>", "<|reserved_0|>"])
    llama3.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])])
    save_dir(root / "llama3", llama3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
             {"eos_token_id": [1, 4], "bos_token_id": 0})
    (root / "llama3" / "chat_template.jinja").write_text(HEADER_TEMPLATE)
    qwen2 = byte_level_backend(default, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|r1|>", "<|r2|>",
                                         "<|r3|>", "<|r4|>"])
    qwen2.normalizer = normalizers.NFC()
    save_dir(root / "qwen2", qwen2, {
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "added_tokens_decoder": {"512": {"content": "<|extra|>", "special": True}},
        "chat_template": [{"name": "default", "template": CHATML_TEMPLATE},
                          {"name": "tool_use", "template": CHATML_TOOLS_TEMPLATE}]},
             {"eos_token_id": [2, 0], "bos_token_id": 0})
    sp_config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                 "unk_token": "<unk>", "chat_template": INST_TEMPLATE}
    save_dir(root / "llama2", sentencepiece_backend(metaspace=False), sp_config)
    # transformers 5 lets tokenizer.json's post-processor (which adds <s>) win over this flag; so must we.
    save_dir(root / "metaspace", sentencepiece_backend(metaspace=True), {**sp_config, "add_bos_token": False})
    return {"default": default, **{style: root / style for style in STYLES[1:]}}


@pytest.fixture(scope="module")
def ours(dirs) -> dict[str, Tokenizer]:
    return {style: Tokenizer.from_dir(path) for style, path in dirs.items()}


@pytest.fixture(scope="module")
def theirs(dirs):
    transformers = pytest.importorskip("transformers")
    return {style: transformers.AutoTokenizer.from_pretrained(path) for style, path in dirs.items()}


def test_special_ids(ours, theirs):
    assert ours["llama3"].eos_token_ids == (1, 4) and ours["llama3"].bos_token_id == 0
    assert ours["qwen2"].eos_token_ids == (2, 0) and ours["qwen2"].bos_token_id is None
    assert ours["qwen2"].pad_token_id == 0 and ours["qwen2"].vocab_size == 513
    assert ours["default"].all_special_ids == tuple(range(7))
    assert ours["metaspace"].encode("hi")[0] == 1 and ours["qwen2"].encode("hi") == ours["qwen2"].encode("hi", False)
    for style, tok in ours.items():
        assert tok.vocab_size == len(theirs[style])
        assert tok.bos_token_id == theirs[style].bos_token_id
        assert set(theirs[style].all_special_ids) <= set(tok.all_special_ids)


def test_hugging_face_surface_matches_transformers(ours, theirs):
    """What code written for a transformers tokenizer calls: eos_token_id, len(), batch_decode."""
    for style, tok in ours.items():
        assert tok.eos_token_id == theirs[style].eos_token_id and len(tok) == len(theirs[style])
        batch = [tok.encode(sample) for sample in SAMPLES]
        for skip in (True, False):
            assert tok.batch_decode(batch, skip_special_tokens=skip) == theirs[style].batch_decode(
                batch, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert ours["llama3"].eos_token_id == 4 and ours["llama3"].eos_token_ids == (1, 4)


@pytest.mark.parametrize("style", STYLES)
@SETTINGS
@given(text=st.text(max_size=40))
def test_encode_decode_match_transformers(ours, theirs, style, text):
    for sample in (text, *SAMPLES):
        for special in (True, False):
            ids = ours[style].encode(sample, add_special_tokens=special)
            assert ids == theirs[style].encode(sample, add_special_tokens=special)
            for skip in (True, False):
                assert ours[style].decode(ids, skip) == theirs[style].decode(
                    ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("style", STYLES)
@SETTINGS
@given(text=st.text(max_size=60).filter(lambda s: "▁" not in s and "<" not in s))
def test_round_trip(ours, style, text):
    tok = ours[style]
    expected = unicodedata.normalize("NFC", text) if style == "qwen2" else text
    if style == "metaspace" and text.startswith(" "):
        expected = text[1:]  # a leading space stands in for the '▁' the pre-tokenizer would prepend
    assert tok.decode(tok.encode(text)) == expected


def messages_strategy():
    content = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<"), max_size=20)
    turn = st.tuples(content, content).map(lambda pair: [{"role": "user", "content": pair[0]},
                                                         {"role": "assistant", "content": pair[1]}])
    return st.tuples(content, st.lists(turn, min_size=1, max_size=3)).map(
        lambda s: [{"role": "system", "content": s[0]}] + [m for t in s[1] for m in t][:-1])


@pytest.mark.parametrize("style", STYLES)
@SETTINGS
@given(messages=messages_strategy(), generation_prompt=st.booleans())
def test_chat_template_matches_transformers(ours, theirs, style, messages, generation_prompt):
    text = ours[style].apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert text == theirs[style].apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                     tokenize=False)
    ids = ours[style].apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    assert ids == ours[style].encode(text, add_special_tokens=False)
    assert ids == list(theirs[style].apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                         tokenize=True, return_dict=True)["input_ids"])


def test_chat_template_tools_and_content(ours, theirs):
    messages = [{"role": "user", "content": "weather in <Paris> & \"Zürich\"?"}]
    tools = [{"type": "function", "function": {"name": "weather", "description": "<city> & 'land'",
                                           "parameters": {"city": "str"}}}]
    text = ours["qwen2"].apply_chat_template(messages, tools=tools)
    assert text == theirs["qwen2"].apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                       tokenize=False)
    assert '"name": "weather"' in text and "<city> & 'land'" in text and text.endswith("<|im_start|>assistant\n")
    assert ours["default"].apply_chat_template(messages, add_generation_prompt=False) == (
        "<s><|user|>\nweather in <Paris> & \"Zürich\"?<|end|>\n")


def test_chat_template_errors(ours, dirs, tmp_path):
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        ours["llama2"].apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(jinja2.TemplateError, match="unknown role"):
        ours["default"].apply_chat_template([{"role": "robot", "content": "x"}])
    sandboxed = Tokenizer(ours["default"].backend, chat_templates={"default": "{{ ''.__class__.__mro__ }}"})
    with pytest.raises(jinja2.exceptions.SecurityError):
        sandboxed.apply_chat_template([])
    (tmp_path / "tokenizer.json").write_bytes((dirs["default"] / "tokenizer.json").read_bytes())
    bare = Tokenizer.from_dir(tmp_path)
    assert bare.eos_token_ids == () and bare.bos_token_id is None and bare.encode("a")[0] == 1
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_bad_directories(dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((dirs["default"] / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|missing|>"}))
    with pytest.raises(ValueError, match="<\\|missing\\|>"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TypeError):
        Tokenizer.from_dir(dirs["default"]).encode([1, 2])
    with pytest.raises(ValueError, match="surrogate"):
        Tokenizer.from_dir(dirs["default"]).encode("a\ud800b")


def stream(tok: Tokenizer, ids: list[int], chunks: list[int], skip: bool) -> list[str]:
    """Feed ids in chunks; check after each step that the text so far is as much of the decode as is final."""
    detok, deltas, fed = IncrementalDetokenizer(tok, skip_special_tokens=skip), [], 0
    for size in chunks:
        deltas.append(detok.step(ids[fed:fed + size]))
        fed += size
        so_far = tok.decode(ids[:fed], skip)
        assert so_far.startswith("".join(deltas)) or so_far.endswith("\ufffd")
        last = [i for i in ids[:fed] if not (skip and i in tok.skipped_ids)][-1:]
        if not so_far.endswith("\ufffd") and not set(last) & tok.byte_token_ids:
            assert "".join(deltas) == so_far  # nothing held back without reason
    deltas.append(detok.finish())
    return deltas


def check_stream(tok: Tokenizer, ids: list[int], chunks: list[int], skip: bool) -> None:
    deltas = stream(tok, ids, chunks, skip)
    full = tok.decode(ids, skip)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("style", STYLES)
@SETTINGS
@given(data=st.data(), skip=st.booleans())
def test_streaming_random_ids(ours, style, data, skip):
    tok = ours[style]
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), min_size=1, max_size=40))
    chunks = data.draw(st.lists(st.integers(1, 3), min_size=len(ids), max_size=len(ids)))
    check_stream(tok, ids, chunks, skip)


@pytest.mark.parametrize("style", STYLES)
def test_streaming_text_splitting_characters(ours, style):
    tok = ours[style]
    text = "Hello 世界! 🙂👍🏽 na\u0303o e\u0301 — the quick brown fox 中文字符"
    ids = tok.encode(text, add_special_tokens=False)
    deltas = stream(tok, ids, [1] * len(ids), skip=True)
    assert "".join(deltas) == tok.decode(ids) == (unicodedata.normalize("NFC", text) if style == "qwen2" else text)
    assert all("\ufffd" not in d for d in deltas)
    per_token = "".join(tok.decode([i]) for i in ids)
    assert per_token != text  # decoding tokens one by one breaks characters or drops spaces; streaming must not


def test_streaming_sentencepiece_keeps_word_spaces(ours):
    tok = ours["llama2"]
    ids = tok.encode("the queue and the memory", add_special_tokens=False)
    assert tok.decode(ids[1:2]) == tok.decode(ids[1:2]).lstrip()  # alone, a word token loses its space
    assert "".join(stream(tok, ids, [1] * len(ids), skip=True)) == "the queue and the memory"


def test_streaming_decodes_a_bounded_window(dirs):
    tok = Tokenizer.from_dir(dirs["default"])
    ids = tok.encode("the scheduler looks at the queue 中文 🙂 " * 60, add_special_tokens=False)
    decoded_lengths = []
    real_decode = tok.decode
    tok.decode = lambda ids, skip=True: decoded_lengths.append(len(ids)) or real_decode(ids, skip)
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.step([i]) for i in ids) + detok.finish()
    assert text == real_decode(ids)
    assert len(ids) > 500 and max(decoded_lengths) <= 8
