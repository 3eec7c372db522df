"""A request's prompt, checked: text (tokenized here, its size checked first) or token ids in the vocabulary."""

from __future__ import annotations

from typing import Any

import numpy as np

from nexus_jax.core.tokenizer import Tokenizer


def prompt_ids(prompt: str | dict[str, Any], tokenizer: Tokenizer | None, vocab_size: int,
               max_model_len: int) -> tuple[str | None, list[int]]:
    """A request's prompt as (its text or None, its token ids); ValueError naming what is wrong with it."""
    if isinstance(prompt, dict):
        unknown = set(prompt) - {"prompt", "prompt_token_ids"}
        if unknown:
            raise ValueError(f"unknown prompt fields: {', '.join(sorted(unknown))}")
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(
                    isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            bad = [int(t) for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
            if not ids:
                raise ValueError("prompt is empty")
            text = prompt.get("prompt")
            if text is not None and not isinstance(text, str):
                raise ValueError(f"the prompt beside prompt_token_ids must be a string, got {type(text).__name__}")
            return text, [int(t) for t in ids]
        prompt = prompt.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt is a string or a dict with prompt_token_ids, got {type(prompt).__name__}")
    if not prompt:  # a tokenizer that adds BOS would turn "" into a prompt of one token, and serve it
        raise ValueError("prompt is empty")
    if tokenizer is None:
        raise ValueError("text prompts need a tokenizer, and this model has none: give prompt_token_ids")
    tokenizer.check_text_length(prompt, max_model_len, "max_model_len")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("prompt is empty")
    return prompt, ids
