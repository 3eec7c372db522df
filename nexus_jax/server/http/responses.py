"""Response bodies of the completions and chat completions endpoints, whole and as stream chunks.

Choice i of prompt p has index p * n + i, as OpenAI numbers the choices of a request with several prompts. Token
text in logprobs is the engine's decoded token (`Logprob.decoded_token`), or `token_id:<id>` without a tokenizer
(vLLM's spelling). prompt_logprobs (vLLM's extra field) come per choice for completions and at the top for chat (one
prompt), in the whole body or a stream's first chunk of each choice; each position None or {token id: {logprob,
rank, decoded_token}}.
"""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

from nexus_jax.core.outputs import CompletionOutput, PositionLogprobs
from nexus_jax.server.http.generation import Generation


class Shaper:
    """Builds one request's bodies. chat: chat completion objects, else text completions; top: how many top
    log-probs each position reports (None: no logprobs asked)."""

    def __init__(self, generation: Generation, model: str, n: int, *, chat: bool, top: int | None,
                 include_usage: bool = False):
        self.gen, self.model, self.n, self.chat, self.top = generation, model, n, chat, top
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + generation.id
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def usage(self) -> dict[str, Any]:
        prompt = sum(self.gen.prompt_tokens)
        completion = sum(len(c.token_ids) for per_prompt in self.gen.completions for c in per_prompt.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(self.gen.cached_tokens)}}

    def whole(self) -> dict[str, Any]:
        """The non-streaming body, once every completion has ended."""
        choices = [self._choice(p * self.n + c.index, "".join(c.text), c.token_ids, c.logprobs, c.finish_reason,
                                c.stop_reason, whole=True)
                   for p, per_prompt in enumerate(self.gen.completions) for c in per_prompt.values()]
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}
        prompt_logprobs = [_prompt_logprobs(p) for p in self.gen.prompt_logprobs]
        if any(p is not None for p in prompt_logprobs):
            if self.chat:
                body["prompt_logprobs"] = prompt_logprobs[0]
            else:
                for choice in choices:
                    choice["prompt_logprobs"] = prompt_logprobs[choice["index"] // self.n]
        return body

    def chunk(self, p: int, delta: CompletionOutput, first: bool) -> str | None:
        """The SSE event of one completion's delta (None when it carries nothing); first: the completion's first
        event, which in chat names the role."""
        if not (delta.text or delta.token_ids or delta.finish_reason or (first and self.chat)):
            return None
        choice = self._choice(p * self.n + delta.index, delta.text, delta.token_ids, delta.logprobs or (),
                              delta.finish_reason, delta.stop_reason, whole=False, first=first)
        prompt_logprobs = _prompt_logprobs(self.gen.prompt_logprobs[p]) if first else None
        if prompt_logprobs is not None and not self.chat:
            choice["prompt_logprobs"] = prompt_logprobs
        return self._event([choice], None, prompt_logprobs if self.chat else None)

    def usage_chunk(self) -> str:
        return self._event([], self.usage())

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None,
               prompt_logprobs: list | None = None) -> str:
        kind = "chat.completion.chunk" if self.chat else self.object
        body: dict[str, Any] = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                                "choices": choices}
        if prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs
        if self.include_usage:
            body["usage"] = usage
        return sse(body)

    def _choice(self, index: int, text: str, ids: Sequence[int], logprobs: Sequence[PositionLogprobs],
                finish_reason: str | None, stop_reason: int | str | None, *, whole: bool,
                first: bool = False) -> dict[str, Any]:
        lp = None if self.top is None else (self._chat_logprobs if self.chat else self._text_logprobs)(ids, logprobs)
        choice: dict[str, Any] = {"index": index, "logprobs": lp, "finish_reason": finish_reason,
                                  "stop_reason": stop_reason}
        if not self.chat:
            choice["text"] = text
        elif whole:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["delta"] = {**({"role": "assistant"} if first else {}), **({"content": text} if text or first
                                                                               else {})}
        return choice

    def _text_logprobs(self, ids: Sequence[int], logprobs: Sequence[PositionLogprobs]) -> dict[str, Any]:
        tokens, token_logprobs, tops, offsets, offset = [], [], [], [], 0
        for token, position in zip(ids, logprobs):
            tokens.append(_text(token, position))
            token_logprobs.append(position[token].logprob)
            tops.append({_text(t, position): lp.logprob for t, lp in self._top(position)})
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, ids: Sequence[int], logprobs: Sequence[PositionLogprobs]) -> dict[str, Any]:
        def entry(token: int, position: PositionLogprobs) -> dict[str, Any]:
            text = _text(token, position)
            return {"token": text, "logprob": position[token].logprob, "bytes": list(text.encode())}
        return {"content": [{**entry(token, position), "top_logprobs": [entry(t, position)
                                                                        for t, _ in self._top(position)]}
                            for token, position in zip(ids, logprobs)]}

    def _top(self, position: PositionLogprobs) -> list[tuple[int, Any]]:
        ranked = sorted(((t, lp) for t, lp in position.items() if lp.rank is not None), key=lambda e: e[1].rank)
        return ranked[:self.top]


def _text(token: int, position: PositionLogprobs) -> str:
    decoded = position[token].decoded_token
    return decoded if decoded is not None else f"token_id:{token}"


def _prompt_logprobs(positions: Sequence[PositionLogprobs | None] | None) -> list | None:
    if positions is None:
        return None
    return [None if p is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                                    for t, lp in p.items()} for p in positions]


def sse(body: Any) -> str:
    """One server-sent event carrying `body` as JSON."""
    return f"data: {json.dumps(body, separators=(',', ':'), ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"  # the event that ends every stream
