"""Text <-> token ids for a Hugging Face model directory, chat templates, and streaming detokenization.

The `tokenizers` library runs the tokenizer.json pipeline; this module adds what transformers reads from the
other files (special tokens, eos ids, chat template) without depending on transformers. `decode` returns what
the tokenizer.json decoder produces: transformers' `clean_up_tokenization_spaces` is not applied (transformers 5
ignores it for BPE tokenizers too), so that streamed text and decoded text always agree.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Sentencepiece byte-fallback tokens; their decoder turns a whole run of them into text or, when any byte in the
# run is invalid, into one U+FFFD per byte, so a run is final only once a different token follows it.
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# The least characters per token Tokenizer.check_text_length assumes, however short the vocabulary's entries: a
# normalizer may drop characters (controls, say), so a text can be longer than its tokens spell.
MIN_CHARS_PER_TOKEN = 32


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, *, chat_templates: dict[str, str] | None = None,
                 special_tokens: dict[str, str] | None = None, extra_eos_token_ids: Iterable[int] = (),
                 bos_token_id: int | None = None, pad_token_id: int | None = None) -> None:
        """Wrap a `tokenizers.Tokenizer`. Most callers want `Tokenizer.from_dir`.

        special_tokens: role ("bos_token", "eos_token", "pad_token", "unk_token") -> token text; bos/eos/pad
        must be in the vocabulary. bos_token_id/pad_token_id are used when the role has no token text.
        """
        self.backend = backend
        self.chat_templates = dict(chat_templates or {})
        self.special_tokens = {role: tok for role, tok in (special_tokens or {}).items() if tok is not None}
        self.bos_token_id = self._role_id("bos_token", bos_token_id)
        self.pad_token_id = self._role_id("pad_token", pad_token_id)
        # transformers' eos_token_id: the eos_token's own id; eos_token_ids adds the model configs' (generation stops
        # at any of them).
        self.eos_token_id = self._role_id("eos_token", None)
        eos_ids = [*extra_eos_token_ids, self.eos_token_id]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
        # What decode(skip_special_tokens=True) drops: added tokens flagged special.
        self.skipped_ids = frozenset(i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
        self.all_special_ids: tuple[int, ...] = tuple(sorted(
            self.skipped_ids | set(self.eos_token_ids) | {i for i in (self.bos_token_id, self.pad_token_id)
                                                          if i is not None}))
        self.byte_token_ids = frozenset(i for tok, i in backend.get_vocab().items() if _BYTE_TOKEN.fullmatch(tok))

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json plus, when present, tokenizer_config.json, chat templates, generation_config.json
        and config.json from a Hugging Face model directory.

        Whether encode() adds bos/eos is decided by tokenizer.json's post-processor alone; like transformers 5,
        the add_bos_token/add_eos_token flags of tokenizer_config.json are ignored when tokenizer.json exists.
        """
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path} (a Hugging Face fast tokenizer file is required)")
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        tok_cfg = _read_json(path / "tokenizer_config.json")
        gen_cfg = _read_json(path / "generation_config.json")
        model_cfg = _read_json(path / "config.json")
        _add_missing_tokens(backend, tok_cfg.get("added_tokens_decoder", {}))
        special_tokens = {role: _token_text(tok_cfg.get(role))
                          for role in ("bos_token", "eos_token", "pad_token", "unk_token")}
        eos_ids = [*_id_list(gen_cfg.get("eos_token_id")), *_id_list(model_cfg.get("eos_token_id"))]
        # Model configs name bos/pad ids too; they count only where tokenizer_config.json is silent, since an
        # explicit null there (Qwen2's bos_token) means the tokenizer has none.
        fallback = {role: None if role in tok_cfg else gen_cfg.get(f"{role}_id", model_cfg.get(f"{role}_id"))
                    for role in ("bos_token", "pad_token")}
        return cls(backend, chat_templates=_load_chat_templates(path, tok_cfg), special_tokens=special_tokens,
                   extra_eos_token_ids=eos_ids, bos_token_id=fallback["bos_token"],
                   pad_token_id=fallback["pad_token"])

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @functools.cached_property
    def max_token_chars(self) -> int:
        """A bound on the characters one token stands for: the longest vocabulary entry (byte-level entries spell
        one character per byte, so no text character is missed), at least MIN_CHARS_PER_TOKEN."""
        longest = max(map(len, self.backend.get_vocab(with_added_tokens=True)), default=0)
        return max(MIN_CHARS_PER_TOKEN, longest)

    def check_text_length(self, text: str, max_tokens: int, limit: str) -> None:
        """Raises ValueError when `text` is too long to encode to max_tokens tokens or fewer, naming `limit`.

        Encoding costs seconds per megabyte and holds the caller, so an oversized text is refused by its length
        alone, before any encoding; the bound is generous (every token its vocabulary's longest), so a text it
        lets through may still turn out too long once encoded.
        """
        bound = max_tokens * self.max_token_chars
        if len(text) > bound:
            raise ValueError(f"prompt text of {len(text)} characters exceeds the limit of {bound} characters "
                             f"({limit} {max_tokens} tokens x {self.max_token_chars} characters per token)")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError as e:  # what tokenizers raises for a str it cannot turn into UTF-8
            raise ValueError("text is not valid Unicode (it contains a lone surrogate code point)") from e

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids past the vocabulary decode to nothing (a model's padded vocabulary can sample them)."""
        ids = list(ids)
        try:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        except OverflowError:  # what tokenizers raises for an id that is no u32
            bad = [i for i in ids if not 0 <= i < 2**32]
            raise ValueError(f"token ids must be in [0, 2**32), got {bad[:5]}") from None

    def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """decode() of each sequence (skip_special_tokens defaults as decode's does, unlike transformers')."""
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """Render `messages` with the model's Jinja chat template (as transformers does).

        Extra keyword arguments (tools, documents, enable_thinking, ...) are passed to the template. With
        tokenize=True the rendered text is encoded without adding special tokens: the template places them.
        """
        template = self._pick_template(kwargs.get("tools"))
        context = {**self.special_tokens, **kwargs}
        text = _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **context)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _pick_template(self, tools: Any) -> str:
        if not self.chat_templates:
            raise ValueError("this tokenizer has no chat template (none in tokenizer_config.json or "
                             "chat_template.jinja); format the prompt yourself")
        if tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        raise ValueError(f"no 'default' chat template among {sorted(self.chat_templates)}")

    def _role_id(self, role: str, fallback: int | None) -> int | None:
        token = self.special_tokens.get(role)
        if token is None:
            return fallback
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{role} {token!r} is not in the tokenizer's vocabulary")
        return token_id


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas as they arrive.

    The concatenation of all deltas (including `finish()`) equals `tokenizer.decode(all_generated_ids)`, and
    no delta ends inside a multi-byte character. Each step decodes only a short window: the tokens since the
    previous emission's start (whose text is already known) plus the new ones, so the cost per token does not
    grow with the sequence. Decoding the window from its own start is what keeps sentencepiece word spaces:
    the leading space the decoder strips from the window's first token is stripped from both texts compared.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window: list[int] = []  # ids from the start of the previous emission on
        self._read = 0  # window[:read] has been emitted

    def step(self, new_token_ids: Iterable[int]) -> str:
        """Add tokens; return the text they complete (possibly "", held back until a character completes)."""
        self._window.extend(new_token_ids)
        emitted, text = self._texts()
        if len(text) <= len(emitted) or text.endswith("\ufffd") or self._ends_in_byte_run():
            return ""
        return self._advance(text[len(emitted):])

    def finish(self) -> str:
        """Return whatever is still held back (e.g. an incomplete character at the end of generation)."""
        emitted, text = self._texts()
        return self._advance(text[len(emitted):])

    def _texts(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        return (decode(self._window[:self._read], self._skip_special_tokens),
                decode(self._window, self._skip_special_tokens))

    def _advance(self, delta: str) -> str:
        del self._window[:self._read]
        self._read = len(self._window)
        return delta

    def _ends_in_byte_run(self) -> bool:
        skipped = self._tokenizer.skipped_ids if self._skip_special_tokens else frozenset()
        for token_id in reversed(self._window):
            if token_id not in skipped:
                return token_id in self._tokenizer.byte_token_ids
        return False


class _GenerationTag(jinja2.ext.Extension):
    # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body.
    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    # Sandboxed: chat templates come with downloaded checkpoints and are untrusted code.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env.from_string(source)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _token_text(value: Any) -> str | None:
    # Special tokens are stored either as plain strings or as serialized AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _add_missing_tokens(backend: tokenizers.Tokenizer, added_tokens_decoder: dict[str, dict]) -> None:
    for token_id, spec in sorted(added_tokens_decoder.items(), key=lambda item: int(item[0])):
        if backend.token_to_id(spec["content"]) is not None:
            continue
        token = tokenizers.AddedToken(spec["content"], single_word=spec.get("single_word", False),
                                      lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                                      normalized=spec.get("normalized", False), special=spec.get("special", False))
        backend.add_tokens([token])
        if backend.token_to_id(spec["content"]) != int(token_id):
            raise ValueError(f"added token {spec['content']!r} should have id {token_id} but got "
                             f"{backend.token_to_id(spec['content'])}")


def _load_chat_templates(path: Path, tok_cfg: dict[str, Any]) -> dict[str, str]:
    # Newer transformers save templates as chat_template.jinja (+ additional_chat_templates/NAME.jinja); older
    # ones put a string, or a list of {"name", "template"}, under tokenizer_config.json's "chat_template".
    configured = tok_cfg.get("chat_template")
    if isinstance(configured, list):
        templates = {item["name"]: item["template"] for item in configured}
    else:
        templates = {"default": configured} if configured else {}
    if (path / "chat_template.jinja").is_file():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    for extra in sorted((path / "additional_chat_templates").glob("*.jinja")):
        templates[extra.stem] = extra.read_text(encoding="utf-8")
    return templates


def load_tokenizer(loaded: Any) -> Tokenizer | None:
    """The tokenizer of a `runner.model.loader.LoadedModel`, or None for a model without one (presets)."""
    return None if loaded.tokenizer_dir is None else Tokenizer.from_dir(loaded.tokenizer_dir)


def eos_token_ids(loaded: Any, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """The tokenizer's end-of-sequence ids, or the checkpoint config's where there is no tokenizer."""
    return tuple(tokenizer.eos_token_ids if tokenizer is not None else loaded.config.eos_token_ids)
