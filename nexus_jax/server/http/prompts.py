"""The engine prompts of a request: text encoded under the server's limits (on a worker thread: a long text would
stall every other request), token ids as they are, chat messages rendered with the model's chat template."""

from __future__ import annotations

import asyncio
from typing import Any

from nexus_jax.core.tokenizer import Tokenizer
from nexus_jax.server import chat
from nexus_jax.server.http.errors import bad_request
from nexus_jax.server.http.protocol import ChatMessage


def encode_text(tokenizer: Tokenizer | None, text: str, limit: tuple[int, str], add_special_tokens: bool = True,
                param: str = "prompt") -> dict[str, Any]:
    """The engine prompt of a text: refused before encoding when too long to fit (as the gRPC server does)."""
    if tokenizer is None:
        raise bad_request("the served model has no tokenizer: send token ids", param)
    if not text:
        raise bad_request("prompt is empty", param)
    try:
        tokenizer.check_text_length(text, *limit)
        return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=add_special_tokens)}
    except ValueError as e:
        raise bad_request(str(e), param) from None


async def completion_prompts(tokenizer: Tokenizer | None, prompt: str | list[Any],
                             limit: tuple[int, str]) -> list[dict[str, Any]]:
    """The prompts of /v1/completions' `prompt`: a text, a list of texts, a list of ids or a list of id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": list(prompt)}]
    return [{"prompt_token_ids": list(p)} if isinstance(p, list) else
            await asyncio.to_thread(encode_text, tokenizer, p, limit) for p in prompt]


def render_chat(tokenizer: Tokenizer | None, messages: list[ChatMessage], add_generation_prompt: bool,
                template_kwargs: dict[str, Any] | None) -> str:
    """The conversation as the model's chat template writes it; 400 naming `messages` when it cannot."""
    try:
        return chat.render_chat(tokenizer, [m.for_template() for m in messages], add_generation_prompt,
                                template_kwargs)
    except ValueError as e:
        raise bad_request(str(e), "messages") from None


async def chat_prompt(tokenizer: Tokenizer | None, messages: list[ChatMessage], add_generation_prompt: bool,
                      template_kwargs: dict[str, Any] | None, limit: tuple[int, str]) -> dict[str, Any]:
    """The engine prompt of a conversation; the template places the special tokens, so none are added."""
    def render_and_encode() -> dict[str, Any]:
        text = render_chat(tokenizer, messages, add_generation_prompt, template_kwargs)
        return encode_text(tokenizer, text, limit, add_special_tokens=False, param="messages")
    return await asyncio.to_thread(render_and_encode)
