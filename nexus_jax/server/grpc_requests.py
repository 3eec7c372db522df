"""A GenerateRequest turned into the engine's prompt and SamplingParams. Bad input raises ValueError whose message
starts with the field it names (SamplingParams' own checks, or the proto field here), which the server returns as
INVALID_ARGUMENT."""

from __future__ import annotations

import json
from typing import Any

from nexus_jax.core.sampling_params import SamplingParams
from nexus_jax.core.tokenizer import Tokenizer
from nexus_jax.server.chat import render_chat
from nexus_jax.server.proto import nexus_pb2 as pb

# Proto fields copied to SamplingParams when set; unset ones keep vLLM's defaults.
_SCALAR_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "ignore_eos", "min_tokens", "n",
                  "logprobs", "skip_special_tokens", "include_stop_str_in_output", "cache_salt", "presence_penalty",
                  "frequency_penalty", "repetition_penalty", "prompt_logprobs")
# Repeated fields copied when not empty (an empty list means unset in proto3).
_LIST_FIELDS = ("stop", "stop_token_ids", "allowed_token_ids", "bad_words")
_DEFAULT_MAX_TOKENS = SamplingParams().max_tokens


def sampling_params(msg: pb.SamplingParams, max_tokens_limit: int | None = None) -> SamplingParams:
    """The request's SamplingParams; raises ValueError/TypeError as SamplingParams does on bad values. An unset
    max_tokens takes the default, lowered to max_tokens_limit where that is smaller."""
    kwargs: dict[str, Any] = {f: getattr(msg, f) for f in _SCALAR_FIELDS if msg.HasField(f)}
    if max_tokens_limit is not None and not msg.HasField("max_tokens"):
        kwargs["max_tokens"] = min(_DEFAULT_MAX_TOKENS, max_tokens_limit)
    kwargs.update({f: list(getattr(msg, f)) for f in _LIST_FIELDS if getattr(msg, f)})
    if msg.logit_bias:
        kwargs["logit_bias"] = dict(msg.logit_bias)
    if msg.HasField("structured_outputs"):
        kwargs["structured_outputs"] = structured_outputs(msg.structured_outputs)
    return SamplingParams(**kwargs)


def structured_outputs(msg: pb.StructuredOutputs) -> dict[str, Any]:
    """The StructuredOutputsParams fields of the message (checked by SamplingParams)."""
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise ValueError("structured_outputs must set one of json, json_object, regex, choice, grammar")
    if kind == "json":
        try:
            return {"json": json.loads(msg.json)}
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
    if kind == "choice":
        return {"choice": list(msg.choice.values)}
    return {kind: getattr(msg, kind)}


def prompt_of(request: pb.GenerateRequest, tokenizer: Tokenizer | None,
              max_tokens: tuple[int, str] | None = None) -> str | dict[str, Any]:
    """The engine's prompt; text and chat are tokenized here (once: the engine takes the ids) so the length can be
    checked. Without a tokenizer, text goes to the engine as it is, which rejects it; chat is refused. max_tokens:
    (the most prompt tokens, the setting's name); text too long to fit is refused before it is encoded. Encoding
    blocks for as long as the text is long: the server calls this on a worker thread for text and chat."""
    kind = request.WhichOneof("input")
    if kind == "text":
        if not request.text:  # tokenized, "" would be a prompt of one BOS token
            raise ValueError("prompt is empty")
        if tokenizer is None:
            return request.text
        return _encode(tokenizer, request.text, max_tokens, add_special_tokens=True)
    if kind == "token_ids":
        return {"prompt_token_ids": list(request.token_ids.ids)}
    if kind == "chat":
        chat = request.chat
        messages = [{"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
                    for m in chat.messages]
        add = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
        try:
            text = render_chat(tokenizer, messages, add)
        except ValueError as e:
            raise ValueError(f"chat.messages: {e}") from None
        # The template places the special tokens, so none are added.
        return _encode(tokenizer, text, max_tokens, add_special_tokens=False)
    raise ValueError("a request needs an input: text, token_ids or chat")


def _encode(tokenizer: Tokenizer, text: str, max_tokens: tuple[int, str] | None,
            add_special_tokens: bool) -> dict[str, Any]:
    if max_tokens is not None:
        tokenizer.check_text_length(text, *max_tokens)
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=add_special_tokens)}
