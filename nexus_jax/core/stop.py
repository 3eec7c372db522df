"""When a completion ends, and exactly which text it emits: EOS, stop token ids, stop strings, max_tokens.

StopChecker applies them all to one sequence: `step(token_id)` after each sampled token. The engine splits it, as
vLLM v1 does: TokenStop (rules 1-3, no text) runs in the engine's fold, where a sequence that ends must free its
blocks at once; TextStop (rule 4, the text and its holdback) runs in the output processor, given each token's
TokenStop result. TextStop runs the sequence's detokenizer itself, because a stop token must never be decoded: its
text is not part of the output, yet the detokenizer may hand back earlier text (a held-back character) in the same
delta as the token.

Rules, checked in vLLM's order for each token (number n of the completion, counting from 1):
1. No stop of any kind while n <= min_tokens (vLLM: min_tokens tokens come before EOS can be generated); the
   token is treated as ordinary text.
2. An EOS id (unless ignore_eos), then a stop_token_ids entry, ends it with "stop" (stop_reason: None for EOS,
   the id for a stop token). As in vLLM the token stays in the completion's token_ids and its text is not
   emitted, unless include_stop_str_in_output.
3. n == max_tokens (or the room the model's context has left) ends it with "length"; EOS/stop ids take
   precedence on that same token, as in vLLM v0.
4. A stop string anywhere in the text, one that began in an earlier token included, ends it with "stop" and
   stop_reason = the string; this wins over 2 and 3, since the string came first in the text (vLLM v1 lets a
   stop string override too). The text is cut before the string, or after it with include_stop_str_in_output;
   nothing after it is emitted. Where several strings match, the one that completes first in the text wins
   (ties: the one starting first), so the result does not depend on how the text was split into tokens.

Streaming holdback: a suffix of the text that could be the start of a stop string is not emitted until later
text rules the string out, or the completion ends another way. Without include_stop_str_in_output, emitted text
is therefore always a prefix of the final text; with it nothing is held back, since a matched string is kept.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Protocol

from nexus_jax.core.outputs import FinishReason
from nexus_jax.core.sampling_params import SamplingParams


class Detokenizer(Protocol):
    """What StopChecker needs from nexus_jax.core.tokenizer.IncrementalDetokenizer."""

    def step(self, new_token_ids: Iterable[int]) -> str: ...

    def finish(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class StopResult:
    text: str  # to append to the completion's text and to stream; possibly ""
    finish_reason: FinishReason | None = None  # None: the completion goes on
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


_GOES_ON, _EOS, _LENGTH = StopResult(""), StopResult("", "stop"), StopResult("", "length")  # immutable: shared


class TokenStop:
    """The token-level stop decisions of one sequence (rules 1-3): what the engine needs to free a sequence's blocks
    as soon as it ends, without any text."""

    def __init__(self, params: SamplingParams, eos_token_ids: Iterable[int] = (),
                 max_new_tokens: int | None = None) -> None:
        """eos_token_ids: the tokenizer's (Tokenizer.eos_token_ids). max_new_tokens: the room the model's context
        leaves for the completion; the smaller of it and params.max_tokens applies.
        """
        limits = [limit for limit in (params.max_tokens, max_new_tokens) if limit is not None]
        if not limits:
            raise ValueError("params.max_tokens is None and no max_new_tokens was given: the completion "
                             "would have no length limit (pass the room left in the model's context)")
        if min(limits) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self._params = params
        self._eos_ids = frozenset(() if params.ignore_eos else eos_token_ids)
        self._stop_ids = frozenset(params.stop_token_ids or ())
        self.max_tokens = min(limits)
        self.num_generated = 0
        self.finish_reason: FinishReason | None = None

    def step(self, token_id: int) -> StopResult:
        """Account for one sampled token; return whether the sequence has ended (the result carries no text)."""
        if self.finish_reason is not None:
            raise RuntimeError(f"step() after the sequence finished ({self.finish_reason})")
        self.num_generated += 1
        can_stop = self.num_generated > self._params.min_tokens
        result = _GOES_ON
        if can_stop and token_id in self._eos_ids:
            result = _EOS
        elif can_stop and token_id in self._stop_ids:
            result = StopResult("", "stop", token_id)
        elif self.num_generated >= self.max_tokens:
            result = _LENGTH
        self.finish_reason = result.finish_reason
        return result


class TextStop:
    """The text of one sequence (rule 4 and the holdback), given each token's token-level result: the output
    processor's half of the rules, which may run on another thread than the engine's TokenStop."""

    def __init__(self, params: SamplingParams, detokenizer: Detokenizer) -> None:
        self._params = params
        self._detokenizer = detokenizer
        self._strings = StopStringScanner(params.stop or [], params.include_stop_str_in_output)
        self._num_generated = 0

    def step(self, token_id: int, result: StopResult) -> StopResult:
        """The token's text to emit, and `result` or, when a stop string completes, the stop string's result."""
        self._num_generated += 1
        can_stop = self._num_generated > self._params.min_tokens
        stopped_by_token = result.finish_reason == "stop"
        if stopped_by_token and not self._params.include_stop_str_in_output:
            delta = self._detokenizer.finish()
        else:
            delta = self._detokenizer.step([token_id])
            if result.finished:
                delta += self._detokenizer.finish()
        text, matched = self._strings.feed(delta, can_stop=can_stop, final=result.finished)
        if matched is not None:
            return StopResult(text, "stop", matched)
        return dataclasses.replace(result, text=text)


class StopChecker(TokenStop):
    """Stop decisions and emitted text of one sequence (see the module docstring for the rules), both halves at
    once."""

    def __init__(self, params: SamplingParams, detokenizer: Detokenizer | None, eos_token_ids: Iterable[int] = (),
                 max_new_tokens: int | None = None) -> None:
        """detokenizer: None for a token-only sequence (no text, so no stop strings); the other arguments as
        TokenStop's."""
        super().__init__(params, eos_token_ids, max_new_tokens)
        if detokenizer is None and params.stop:
            raise ValueError(f"stop strings {params.stop} need a detokenizer (the sequence has no text)")
        self._text = None if detokenizer is None else TextStop(params, detokenizer)

    def step(self, token_id: int) -> StopResult:
        """Account for one sampled token; return the text it releases and whether the sequence has ended."""
        result = super().step(token_id)
        if self._text is not None:
            result = self._text.step(token_id, result)
            self.finish_reason = result.finish_reason
        return result


class StopStringScanner:
    """Finds stop strings in text arriving in pieces and decides which text may be emitted so far.

    The strings' Aho-Corasick automaton (shared by every scanner of the same strings) carries the match state from
    piece to piece, so a piece costs time in its own length, however many and however long the strings are.
    """

    def __init__(self, stop: Sequence[str], include_in_output: bool) -> None:
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self._automaton = _automaton(tuple(stop))
        self._include = include_in_output
        self._node = 0
        # The longest suffix of the text so far that is a proper prefix of a stop string: any match that ends
        # in later text starts inside it. Without include_in_output it is also the text held back.
        self._tail = ""

    def feed(self, delta: str, *, can_stop: bool = True, final: bool = False) -> tuple[str, str | None]:
        """Add `delta`; return (text to emit now, matched stop string or None).

        can_stop False (during min_tokens) ignores matches that end in `delta` but still tracks partial ones.
        final: the sequence ends here for another reason, so nothing is held back any more.
        """
        text = self._tail + delta
        sent = len(self._tail) if self._include else 0  # text[:sent] has been emitted already
        a, node = self._automaton, self._node
        for i, char in enumerate(delta):
            while node and char not in a.goto[node]:
                node = a.fail[node]
            node = a.goto[node].get(char, 0)
            stop = a.match[node]
            if can_stop and stop is not None:  # the first to complete; of those, the longest (it starts first)
                end = len(self._tail) + i + 1
                return text[sent:end if self._include else end - len(stop)], stop
        self._node = node
        self._tail = text[len(text) - a.hold[node]:] if a.hold[node] else ""
        held = 0 if final or self._include else len(self._tail)
        return text[sent:len(text) - held], None


@dataclasses.dataclass
class _Automaton:
    """Aho-Corasick over stop strings; node 0 is the empty prefix. Per node: goto (its children by character),
    fail (the node of its longest proper suffix that is a prefix too), match (the longest string ending here),
    hold (the length of its longest suffix that is a proper prefix of a string: the text to hold back)."""
    goto: list[dict[str, int]]
    fail: list[int]
    match: list[str | None]
    hold: list[int]


@functools.lru_cache(maxsize=32)  # the n completions of a request, and requests sending the same list, share one
def _automaton(stops: tuple[str, ...]) -> _Automaton:
    goto: list[dict[str, int]] = [{}]
    depth, match = [0], [None]
    for stop in stops:
        node = 0
        for char in stop:
            if char not in goto[node]:
                goto[node][char] = len(goto)
                goto.append({})
                depth.append(depth[node] + 1)
                match.append(None)
            node = goto[node][char]
        match[node] = stop
    fail, hold = [0] * len(goto), [0] * len(goto)
    queue = collections.deque([0])
    while queue:  # breadth first: a node's fail node is shallower, so it is complete when the node needs it
        node = queue.popleft()
        if node:
            match[node] = match[node] or match[fail[node]]
            hold[node] = depth[node] if goto[node] else hold[fail[node]]
        for char, child in goto[node].items():
            if node:
                f = fail[node]
                while f and char not in goto[f]:
                    f = fail[f]
                fail[child] = goto[f].get(char, 0)
            queue.append(child)
    return _Automaton(goto, fail, match, hold)
