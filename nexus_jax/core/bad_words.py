"""vLLM's bad_words: words a completion must not contain, as token sequences banned on the device.

Each word is tokenized as written and with a leading space (a word mid-text is usually a different token than at
the start); the spaced form counts only when it gives a different first token and as many tokens (vLLM's rule). A
one-token word is banned at every step. A longer word bans its last token at a step where the completion's last
tokens spell the rest of it, so checking needs the completion's latest token on the host (see `needs_history`).
As in vLLM, only generated tokens are matched, never the prompt.
"""

from __future__ import annotations

from typing import Any, Sequence


class BadWords:
    def __init__(self, words: Sequence[str], tokenizer: Any, vocab_size: int):
        """Tokenizes `words` (checked non-empty strings, see SamplingParams) with `tokenizer` (encode(text,
        add_special_tokens)); raises ValueError when a word yields no token or ids outside [0, vocab_size)."""
        sequences: list[list[int]] = []
        for word in words:
            plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if not plain:
                raise ValueError(f"bad_words entry {word!r} tokenizes to nothing")
            sequences.append(plain)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                sequences.append(spaced)
        bad = [t for seq in sequences for t in seq if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"bad_words tokenize to ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        self.always = list(dict.fromkeys(seq[0] for seq in sequences if len(seq) == 1))
        # (the tokens before the last, the last): the last is banned right after the others.
        self.tails = [(tuple(seq[:-1]), seq[-1]) for seq in sequences if len(seq) > 1]

    @property
    def needs_history(self) -> bool:
        """Whether a step's bans depend on the tokens sampled just before it (a word of several tokens)."""
        return bool(self.tails)

    def banned(self, output_token_ids: Sequence[int]) -> list[int]:
        """The ids the next token may not be, after `output_token_ids`."""
        ids = list(self.always)
        for prefix, last in self.tails:
            n = len(prefix)
            if len(output_token_ids) >= n and tuple(output_token_ids[len(output_token_ids) - n:]) == prefix:
                ids.append(last)
        return ids
