"""A conversation as the served model's chat template writes it: what the HTTP and gRPC servers both render."""

from __future__ import annotations

from typing import Any

import jinja2

from nexus_jax.core.tokenizer import Tokenizer


def render_chat(tokenizer: Tokenizer | None, messages: list[dict[str, Any]], add_generation_prompt: bool,
                template_kwargs: dict[str, Any] | None = None) -> str:
    """The conversation's text (messages as chat templates read them: role, content, name); ValueError when
    there is no template or it refuses the messages."""
    if tokenizer is None:
        raise ValueError("the served model has no tokenizer, so no chat template")
    if not messages:
        raise ValueError("messages must not be empty")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                             **(template_kwargs or {}))
    except (ValueError, TypeError, jinja2.TemplateError) as e:
        raise ValueError(f"the chat template refused the messages: {e}") from None
