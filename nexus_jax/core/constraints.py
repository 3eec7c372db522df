"""What one sequence may sample beyond the sampler's own settings: allowed_token_ids, bad_words and a structured
output grammar, turned into the plain per-step tables the runner takes (a packed allowed mask, banned ids).

A grammar or a bad word of several tokens needs the sequence's latest token on the host to say what the next may
be (`needs_history`). The overlapped loop plans such a sequence every step anyway and hands its limits to the
executor late (StepInput.late): computed once the step in flight has landed, while the next forward pass runs.
Executors that cannot take them late (the disaggregated workers) never see it planned while a sample is in flight.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Sequence

import numpy as np

from nexus_jax.core.bad_words import BadWords
from nexus_jax.core.grammar import GrammarCompiler, GrammarMatcher
from nexus_jax.core.sampling_params import SamplingParams
from runner.sampling import mask_words, token_mask

log = logging.getLogger(__name__)


class TokenConstraints:
    def __init__(self, allowed: np.ndarray | None, bad_words: BadWords | None, grammar: GrammarMatcher | None):
        self.allowed, self.bad_words, self.grammar = allowed, bad_words, grammar
        self.needs_history = grammar is not None or (bad_words is not None and bad_words.needs_history)
        self.rejected = False  # the grammar refused a sampled token (which its mask should have prevented)

    def banned(self, output_token_ids: Sequence[int]) -> list[int]:
        return [] if self.bad_words is None else self.bad_words.banned(output_token_ids)

    def accept(self, token: int) -> None:
        if self.grammar is not None and not self.grammar.accept(token):
            # Only a token the mask allowed is sampled, unless every token was masked out (min_tokens banning the
            # EOS that a complete grammar requires): the completion ends rather than leave its grammar.
            log.warning("the grammar refused sampled token %d; the completion ends", token)
            self.rejected = True

    @property
    def finished(self) -> bool:
        """The grammar accepted its stop token, or refused a token: the completion ends."""
        return self.grammar is not None and (self.grammar.terminated or self.rejected)


class ConstraintFactory:
    """Builds each request's TokenConstraints; owns the engine's grammar compiler (made on first use)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, tuple(stop_token_ids)
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()  # requests are prepared on several threads (AsyncLLM, the servers)

    @property
    def compiler(self) -> GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                try:
                    self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.stop_token_ids)
                except ImportError as e:  # a machine without the wheel: refuse the request, keep serving
                    raise ValueError(f"structured_outputs needs the xgrammar package, which this server lacks "
                                     f"({e})") from None
            return self._compiler

    def limits(self, seqs: Sequence[Any]) -> tuple[list[list[int]], list[np.ndarray | None]]:
        """Per sampling row, a Request (None: the row samples nothing that will be kept): the ids it must not
        sample and the packed mask of those it may sample (None: any)."""
        return ([banned_ids(s) if s is not None else [] for s in seqs],
                self.masks([s.constraints if s is not None else None for s in seqs]))

    def masks(self, rows: Sequence[TokenConstraints | None]) -> list[np.ndarray | None]:
        """Each row's packed bitmask of the ids its next token may be (None: any). The grammars' masks are filled
        in one batched call, on xgrammar's threads: a step of 64 structured rows costs one call, not 64."""
        out = [None if c is None else c.allowed for c in rows]
        grammars = [i for i, c in enumerate(rows) if c is not None and c.grammar is not None]
        if grammars:
            table = np.empty((len(grammars), mask_words(self.vocab_size)), np.int32)
            self.compiler.fill_masks([rows[i].grammar for i in grammars], table)
            for i, mask in zip(grammars, table):
                out[i] = mask if out[i] is None else mask & out[i]
        return out

    def prepare(self, params: SamplingParams) -> Callable[[], TokenConstraints | None]:
        """Checks and compiles what `params` constrain (ValueError naming the field), once per request; returns
        what makes each of its sequences' own constraints (a grammar matcher is per sequence)."""
        allowed = (token_mask(params.allowed_token_ids, self.vocab_size) if params.allowed_token_ids is not None
                   else None)
        bad_words = None
        spec = params.structured_outputs
        if (params.bad_words or spec is not None) and self.tokenizer is None:
            raise ValueError(f"{'bad_words' if params.bad_words else 'structured_outputs'} need a tokenizer, "
                             "and this model has none")
        if params.bad_words:
            bad_words = BadWords(params.bad_words, self.tokenizer, self.vocab_size)
        compiled = self.compiler.compile(spec) if spec is not None else None
        if allowed is None and bad_words is None and compiled is None:
            return lambda: None
        return lambda: TokenConstraints(allowed, bad_words,
                                        None if compiled is None else self.compiler.matcher(compiled))


def banned_ids(seq: Any) -> list[int]:
    """Until min_tokens are out, EOS and the stop ids are not sampled at all (vLLM's behaviour); bad words. A
    request's samples in flight count as out."""
    words = seq.constraints.banned(seq.output_token_ids) if seq.constraints else []
    if len(seq.output_token_ids) + seq.num_pending >= seq.params.min_tokens:
        return words
    return seq.banned_ids + words if words else seq.banned_ids
