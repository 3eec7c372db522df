"""Per-request generation settings with vLLM's names, defaults and meaning.

Porting vLLM code means changing the import: `from nexus_jax.core.sampling_params import SamplingParams`. Fields
vLLM has and nexus-jax does not (logits_processors, guided_decoding's legacy name, ...) raise TypeError rather than
being silently ignored. Arguments are keyword-only, so a positional call written for vLLM's field order fails loudly.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from nexus_jax.core.structured_outputs import StructuredOutputsParams
from runner.sampling import GREEDY_TEMPERATURE, SamplingRow

# vLLM's default `max_logprobs`: the most top log-probs one request may ask for per token.
MAX_LOGPROBS = 20
# Caps on the stop conditions (vLLM has none): each stop string costs the request's setup time and memory, each
# stop id a slot in the sampler's banned-id table while min_tokens holds; far above what a real request sends.
MAX_STOP_STRINGS = 128
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_CACHE_SALT_CHARS = 256
# logit_bias: OpenAI's range for a value, and a cap on the entries (each is a slot in the sampler's bias table).
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 1024
# OpenAI's range of presence_penalty and frequency_penalty; a repetition_penalty cap that keeps logits finite in
# float32 however far it scales them.
MAX_PENALTY = 2.0
MAX_REPETITION_PENALTY = 1e6
# bad_words: each word is a few banned-id entries every step, checked on the host per token.
MAX_BAD_WORDS = 128
MAX_BAD_WORD_CHARS = 256


@dataclasses.dataclass(kw_only=True)
class SamplingParams:
    """How to sample one request's completions.

    n: completions per prompt. temperature: 0 (below 1e-5) is greedy. top_k: 0 or -1 = off. seed: None draws
    one per request (so a sampled completion is reproducible only with a seed). stop: strings that end a
    completion; the matched string is cut from the text unless include_stop_str_in_output. stop_token_ids:
    token ids that end a completion (the token stays in token_ids, its text is not emitted). max_tokens: None
    means up to the model's context. min_tokens: no stop (EOS, stop ids, stop strings) can end a completion
    before this many tokens have been generated; the first token that can stop it is token min_tokens + 1.
    logprobs: how many top log-probs to report per generated token (None: none, 0: only the sampled token's).
    presence_penalty, frequency_penalty (each in [-2, 2]; 0 = off): a token the output already holds c times
    loses frequency_penalty * c + presence_penalty from its logit. repetition_penalty (> 0; 1 = off): the logit of
    every token of the prompt or the output is divided by it when positive, multiplied when negative (as
    transformers' RepetitionPenaltyLogitsProcessor). All are applied on the device, after logit_bias and before
    temperature and the filters.
    allowed_token_ids: the only token ids a completion may sample (None: any; duplicates are dropped), applied
    on the device before everything else; EOS ends it only if listed.
    logit_bias: token id -> a value in [-100, 100] added to its logit before temperature and filters, every step
    (OpenAI's logit_bias; at most MAX_LOGIT_BIAS_ENTRIES entries); log-probs stay those of the raw logits.
    Limits: at most MAX_STOP_STRINGS stop strings of at most MAX_STOP_STRING_CHARS characters each, at most
    MAX_STOP_TOKEN_IDS stop_token_ids; duplicates in either list are dropped.
    cache_salt: requests share cached prefix blocks only with requests of the same salt (None: the unsalted
    ones), as vLLM's cache_salt: give each tenant its own, and no tenant can learn from the time to first token
    which prompts another sent. A non-empty string of at most MAX_CACHE_SALT_CHARS characters. (vLLM takes it
    in the prompt dict; here it is a setting, so the gRPC API and batch lines carry it with the others.)
    bad_words: words the completion must not contain (vLLM's: each tokenized with and without a leading space; a
    one-token word is banned always, a longer one bans its last token right after the rest; only generated
    tokens count), at most MAX_BAD_WORDS of at most MAX_BAD_WORD_CHARS characters.
    prompt_logprobs: per prompt token, its log-prob given the tokens before it plus the top prompt_logprobs
    tokens (0: the prompt token's only), in RequestOutput.prompt_logprobs (the first position is None). Such a
    request computes its whole prompt: it takes no prefix-cache hit (which would skip positions).
    structured_outputs: a StructuredOutputsParams (or a dict of its fields): JSON schema, any JSON object, regex,
    choice or EBNF grammar the completion follows; it ends when the grammar is complete (its EOS is sampled).
    spaces_between_special_tokens: accepted for compatibility and has no effect; the tokenizer.json decoder
    decides spacing (as in transformers' fast tokenizers, which ignore the flag as well).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
    cache_salt: str | None = None
    logit_bias: dict[int, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self.n = _integer(self.n, "n", minimum=1)
        # The sampler's fields go through the sampler's own check (float32 ranges included); a missing seed is
        # drawn later, so any seed stands in for it here.
        SamplingRow.validated(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              seed=0 if self.seed is None else self.seed)
        self.temperature, self.top_p, self.min_p = float(self.temperature), float(self.top_p), float(self.min_p)
        self.top_k = _integer(self.top_k, "top_k", minimum=-1)
        if self.seed is not None:
            self.seed = int(self.seed)
        if self.max_tokens is not None:
            self.max_tokens = _integer(self.max_tokens, "max_tokens", minimum=1)
        self.min_tokens = _integer(self.min_tokens, "min_tokens", minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None:
            self.logprobs = _integer(self.logprobs, "logprobs", minimum=0)
            if self.logprobs > MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _token_ids(self.stop_token_ids)
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt
                                            or len(self.cache_salt) > MAX_CACHE_SALT_CHARS):
            raise ValueError(f"cache_salt must be None or a non-empty string of at most {MAX_CACHE_SALT_CHARS} "
                             f"characters, got {self.cache_salt!r:.80}")
        self.logit_bias = _logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(dict.fromkeys(
                _integer(t, "allowed_token_ids entry", minimum=0) for t in _as_list(self.allowed_token_ids,
                                                                                    "allowed_token_ids")))
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty (None allows every token)")
        self.bad_words = _bad_words(self.bad_words)
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _integer(self.prompt_logprobs, "prompt_logprobs", minimum=0)
            if self.prompt_logprobs > MAX_LOGPROBS:
                raise ValueError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
        self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)
        for name in ("presence_penalty", "frequency_penalty"):
            setattr(self, name, _bounded(getattr(self, name), name, -MAX_PENALTY, MAX_PENALTY))
        self.repetition_penalty = _bounded(self.repetition_penalty, "repetition_penalty", 0.0, MAX_REPETITION_PENALTY)
        if self.repetition_penalty == 0.0:
            raise ValueError("repetition_penalty must be > 0, got 0.0")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
                     "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def to_row(self, seed: int) -> SamplingRow:
        """The device sampler's row of a sequence with these settings, at step 0; built once per sequence, the
        engine then only advances its step.

        seed: the sequence's seed (clone_for_child gives every sequence one).
        """
        return SamplingRow.validated(temperature=0.0 if self.greedy else self.temperature, top_k=self.top_k,
                                     top_p=self.top_p, min_p=self.min_p, seed=seed)

    def clone_for_child(self, index: int, drawn_seed: int) -> SamplingParams:
        """Settings of completion `index` of the n: n=1 and its own seed.

        As in vLLM, child i of a request seeded s gets seed s + i, so n=1 with seed s reproduces child 0. An
        unseeded request uses `drawn_seed`, a seed the engine drew at random for it, in place of s.
        """
        index = _integer(index, "index", minimum=0)
        if index >= self.n:
            raise ValueError(f"index must be in [0, n={self.n}), got {index}")
        base = self.seed if self.seed is not None else _integer(drawn_seed, "drawn_seed")
        return dataclasses.replace(self, n=1, seed=base + index)


def _integer(value: Any, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _stop_strings(stop: str | Iterable[str] | None) -> list[str]:
    entries = [] if stop is None else [stop] if isinstance(stop, str) else _as_list(stop, "stop")
    if len(entries) > MAX_STOP_STRINGS:
        raise ValueError(f"stop has {len(entries)} strings, more than the limit of {MAX_STOP_STRINGS}")
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"stop entries must be non-empty strings, got {entry!r}")
        if len(entry) > MAX_STOP_STRING_CHARS:
            raise ValueError(f"a stop string of {len(entry)} characters exceeds the limit of "
                             f"{MAX_STOP_STRING_CHARS} characters")
    return list(dict.fromkeys(entries))


def _token_ids(ids: Iterable[int] | None) -> list[int]:
    entries = [] if ids is None else _as_list(ids, "stop_token_ids")
    if len(entries) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"stop_token_ids has {len(entries)} entries, more than the limit of {MAX_STOP_TOKEN_IDS}")
    # Duplicates would only lengthen the banned-id rows the sampler gets each step while min_tokens holds.
    return list(dict.fromkeys(_integer(token_id, "stop_token_ids entry", minimum=0) for token_id in entries))


def _bad_words(words: Iterable[str] | None) -> list[str] | None:
    entries = [] if words is None else _as_list(words, "bad_words")
    if len(entries) > MAX_BAD_WORDS:
        raise ValueError(f"bad_words has {len(entries)} entries, more than the limit of {MAX_BAD_WORDS}")
    for word in entries:
        if not isinstance(word, str) or not word.strip() or len(word) > MAX_BAD_WORD_CHARS:
            raise ValueError(f"bad_words entries must be non-blank strings of at most {MAX_BAD_WORD_CHARS} "
                             f"characters, got {word!r:.80}")
    return list(dict.fromkeys(entries)) or None


def _bounded(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _logit_bias(bias: Mapping[int, float] | None) -> dict[int, float] | None:
    """{token id: value} checked and as ints and floats; None when empty (no row in the sampler's bias table)."""
    if bias is None:
        return None
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias must be a mapping of token ids to values, got {bias!r}")
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(f"logit_bias has {len(bias)} entries, more than the limit of {MAX_LOGIT_BIAS_ENTRIES}")
    checked = {}
    for token_id, value in bias.items():
        token_id = _integer(token_id, "logit_bias token id", minimum=0)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not abs(value) <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                             f"got {value!r} for token {token_id}")
        checked[token_id] = float(value)
    return checked or None


def _as_list(value: Any, name: str) -> list[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a list, got {value!r}")
    return list(value)
