"""Structured output through xgrammar: a request's StructuredOutputsParams compiled once per distinct spec, and a
matcher per sequence that advances on every accepted token; the packed bitmasks of the tokens each allows next
(the sampler's `allowed` layout, runner.sampling.token_mask) are filled for a whole step at once.

xgrammar is imported on first use: it pulls in torch, seconds of import a server without structured requests
need not pay. Compiling runs where the request is prepared (the caller's thread for AsyncLLM and the servers),
so a slow schema never stalls the engine loop; the cache makes a repeated spec free.
"""

from __future__ import annotations

import collections
import json
import threading
from typing import Any, Sequence

import numpy as np

from nexus_jax.core.structured_outputs import StructuredOutputsParams

# Compiled grammars kept per engine: a server sees few distinct schemas, each compiled once.
CACHE_SIZE = 256
# A JSON string character as xgrammar writes it for length-bounded strings, and as JSON allows it (GrammarCompiler.
# _json_schema), in xgrammar's EBNF spelling.
_LAX_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\"\\\0-\x1f]'


class GrammarCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]):
        """tokenizer: nexus_jax.core.tokenizer.Tokenizer (its tokenizers backend gives the vocabulary);
        vocab_size: the model's (logits width, may exceed the tokenizer's); stop_token_ids: what ends a
        completion once the grammar is complete (the engine's EOS ids)."""
        import xgrammar as xgr

        self._xgr = xgr
        vocab = {text: i for text, i in tokenizer.backend.get_vocab(with_added_tokens=True).items() if i < vocab_size}
        # xgrammar sees only the ids the tokenizer (or a stop token) has: it counts every id without text as a
        # special token and scans that list linearly on each accept_token (xgrammar 0.2.9), so a model whose
        # logits are far wider than its tokenizer (a 512-token tokenizer on a 128k-logit preset) paid ~30 us per
        # row per step. The ids above it are never allowed (fill_masks leaves their bits zero).
        self.grammar_vocab_size = min(vocab_size, 1 + max([*vocab.values(), *stop_token_ids], default=0))
        encoded = [""] * self.grammar_vocab_size
        for text, i in vocab.items():
            encoded[i] = text
        # The metadata transformers' tokenizers would give xgrammar (byte-level or not, prefix space), detected
        # from the tokenizer.json that nexus-jax loads without transformers.
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.backend.to_str())
        info = xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=self.grammar_vocab_size,
                                 stop_token_ids=list(stop_token_ids) or None,
                                 add_prefix_space=meta["add_prefix_space"])
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._batch = xgr.BatchGrammarMatcher()
        self._cache: collections.OrderedDict[tuple[str, str], Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar of `spec` (cached); ValueError naming the field when it does not compile."""
        key = spec.key()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        kind, text = key
        try:
            if kind == "json":
                compiled = self._json_schema(text)
            elif kind == "json_object":  # compact, as the schemas (xgrammar's built-in JSON takes free whitespace)
                compiled = self._json_schema('{"type": "object"}')
            elif kind == "regex":
                compiled = self._compiler.compile_regex(text)
            elif kind == "choice":
                alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
                compiled = self._compiler.compile_grammar(f"root ::= {alternatives}")
            else:
                compiled = self._compiler.compile_grammar(text)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"structured_outputs.{kind} does not compile: {str(e).strip()[:300]}") from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _json_schema(self, schema: str) -> Any:
        """Compact JSON (a random or weak model given free whitespace may spend every token on it) that is valid.

        xgrammar 0.2.9 writes the characters of a length-bounded string (minLength / maxLength) as _LAX_STRING_CHAR,
        which admits the raw control characters JSON forbids inside strings (seen: a form feed in a "name" with
        maxLength 8, which json.loads refuses); its unbounded strings exclude them. Such grammars get that class.
        """
        grammar = str(self._xgr.Grammar.from_json_schema(schema, any_whitespace=False))
        if _LAX_STRING_CHAR not in grammar:
            return self._compiler.compile_json_schema(schema, any_whitespace=False)
        return self._compiler.compile_grammar(grammar.replace(_LAX_STRING_CHAR, _JSON_STRING_CHAR))

    def matcher(self, compiled: Any) -> GrammarMatcher:
        return GrammarMatcher(self._xgr.GrammarMatcher(compiled))

    def fill_masks(self, matchers: Sequence[GrammarMatcher], table: np.ndarray) -> None:
        """Row i of `table` [len(matchers), ceil(vocab / 32)] i32 := the packed bitmask matchers[i] allows next."""
        handles = [m.matcher for m in matchers]
        words = -(-self.grammar_vocab_size // 32)
        if words == table.shape[1]:
            self._batch.batch_fill_next_token_bitmask(handles, table)
            return
        narrow = np.empty((len(matchers), words), np.int32)
        self._batch.batch_fill_next_token_bitmask(handles, narrow)
        table[:, :words] = narrow
        table[:, words:] = 0


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: Any):
        self.matcher = matcher  # xgrammar's (GrammarCompiler.fill_masks fills many at once)

    def accept(self, token: int) -> bool:
        """Advances over a sampled token; False when the grammar refuses it (it was not in the last mask)."""
        return self.matcher.is_terminated() or bool(self.matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: the completion ends here."""
        return self.matcher.is_terminated()
