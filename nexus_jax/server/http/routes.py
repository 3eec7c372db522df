"""The app: /v1/completions, /v1/chat/completions (plain ASGI, nexus_jax.server.http.direct), /v1/models,
/tokenize, /detokenize (FastAPI), all behind the bearer token when the server has one; /health and /metrics open,
as probes and scrapers carry no token."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Header
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

from nexus_jax.core.sampling_params import SamplingParams
from nexus_jax.server.http.direct import GenerationRoutes, authorized, unauthorized
from nexus_jax.server.http.errors import APIError, bad_request, install_handlers
from nexus_jax.server.http.generation import Admission, ClientWatch, Generation
from nexus_jax.server.http.prompts import chat_prompt, completion_prompts, encode_text, render_chat
from nexus_jax.server.http.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)
from nexus_jax.server.http.responses import DONE, Shaper, sse
from nexus_jax.server.metrics import EngineMetrics, replicas_of
from nexus_jax.server.options import ServerOptions, prompt_limit

# OpenAI's default max_tokens of a text completion; a chat completion runs to the end of the context by default.
COMPLETION_MAX_TOKENS = 16


class EventStream(StreamingResponse):
    """Server-sent events whose generation is closed however the response ends: at its end, when the client
    disconnects (even while no event is due), or when the server cancels it."""

    def __init__(self, events: AsyncIterator[str], generation: Generation, watch: ClientWatch):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.generation, self.watch = generation, watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.watch.unless_gone(self.stream_response(send))
        except OSError:  # the client went away mid-write
            pass
        finally:
            await self.body_iterator.aclose()
            await self.generation.close()


def build_app(llm: Any, options: ServerOptions, metrics: EngineMetrics, admission: Admission) -> ASGIApp:
    """The app over `llm` (an AsyncLLM or a ReplicatedAsyncLLM)."""
    app = FastAPI(title="nexus-jax", docs_url=None, redoc_url=None, openapi_url=None)
    install_handlers(app)
    guarded = [Depends(_bearer(options.auth_token))] if options.auth_token else []
    engine = llm.engine
    limit = prompt_limit(options, engine.max_model_len)

    def check_model(model: str | None) -> None:
        if model is not None and model != options.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {options.model_name!r}",
                           param="model", code="model_not_found")

    async def respond(watch: ClientWatch, body: SamplingFields, prompts: list[dict[str, Any]], params: SamplingParams,
                      *, chat: bool, top: int | None, program: str | None, thread: str | None) -> Response:
        gen = Generation(llm, admission, metrics, prompts, params, priority=body.priority,
                         program_id=body.program_id or program, thread_id=body.thread_id or thread or "",
                         prompt_param="messages" if chat else "prompt", structured_param=body.structured_source())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        shaper = Shaper(gen, options.model_name, params.n, chat=chat, top=top, include_usage=include_usage)
        events = gen.events() if body.stream else None
        try:
            # Input the engine refuses shows up at the first output: a 400 before any header is sent.
            first = await watch.unless_gone(anext(events) if events else gen.collect())
        except BaseException:
            await gen.close()
            raise
        if events is None or first is None:
            await gen.close()
            # 499: nobody reads it, the client disconnected (nginx's code)
            return JSONResponse(shaper.whole()) if first is not None else Response(status_code=499)
        return EventStream(_events(shaper, first, events), gen, watch)

    async def completions(body: CompletionRequest, watch: ClientWatch, x_program_id: str | None,
                          x_thread_id: str | None) -> Response:
        check_model(body.model)
        body.refuse_unsupported()
        params = body.sampling_params(body.max_tokens, body.logprobs, options.max_tokens_limit,
                                      COMPLETION_MAX_TOKENS)
        prompts = await completion_prompts(engine.tokenizer, body.prompt, limit)
        return await respond(watch, body, prompts, params, chat=False, top=body.logprobs, program=x_program_id,
                             thread=x_thread_id)

    async def chat_completions(body: ChatCompletionRequest, watch: ClientWatch, x_program_id: str | None,
                               x_thread_id: str | None) -> Response:
        check_model(body.model)
        body.refuse_unsupported()
        top = (body.top_logprobs or 0) if body.logprobs else None
        newer = body.max_completion_tokens is not None  # OpenAI's newer name for max_tokens
        params = body.sampling_params(body.max_completion_tokens if newer else body.max_tokens, top,
                                      options.max_tokens_limit, None,
                                      {"max_tokens": "max_completion_tokens" if newer else "max_tokens",
                                       "logprobs": "top_logprobs"})
        prompt = await chat_prompt(engine.tokenizer, body.messages, body.add_generation_prompt,
                                   body.chat_template_kwargs, limit)
        return await respond(watch, body, [prompt], params, chat=True, top=top, program=x_program_id,
                             thread=x_thread_id)

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": options.model_name, "object": "model", "created": 0,
                                            "owned_by": "nexus-jax", "max_model_len": engine.max_model_len}]}

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give prompt or messages, not both", "prompt")

        def encode() -> dict[str, Any]:
            if body.messages is not None:
                text = render_chat(engine.tokenizer, body.messages, body.add_generation_prompt, None)
                return encode_text(engine.tokenizer, text, limit, add_special_tokens=False, param="messages")
            return encode_text(engine.tokenizer, body.prompt, limit, body.add_special_tokens)
        ids = (await asyncio.to_thread(encode))["prompt_token_ids"]
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        if engine.tokenizer is None:
            raise bad_request("the served model has no tokenizer", "tokens")
        if any(not 0 <= t < engine.vocab_size for t in body.tokens):
            raise bad_request(f"token ids must be in [0, {engine.vocab_size})", "tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens)}

    @app.get("/health")
    async def health() -> Response:
        """200 while an engine runs and the server takes requests; 503 when draining or every engine stopped."""
        serving = any(r.dead_error is None for r in replicas_of(llm)) and not admission.draining
        return Response(status_code=200 if serving else 503)

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return GenerationRoutes(app, {"/v1/completions": (CompletionRequest, completions),
                                  "/v1/chat/completions": (ChatCompletionRequest, chat_completions)},
                            options.auth_token)


async def _events(shaper: Shaper, first: tuple[int, Any], events: AsyncIterator[tuple[int, Any]]
                  ) -> AsyncIterator[str]:
    """The stream's events: the deltas, the usage when asked for, [DONE]; an error in the middle becomes an
    error event (the status line went out with the first event)."""
    started: set[tuple[int, int]] = set()
    ended: set[tuple[int, int]] = set()  # a request's later outputs repeat its ended completions, with no delta
    try:
        item = first
        while item is not None:
            p, out = item
            for c in out.outputs:
                key = (p, c.index)
                if key in ended:
                    continue
                event = shaper.chunk(p, c, first=key not in started)
                started.add(key)
                if c.finish_reason is not None:
                    ended.add(key)
                if event is not None:
                    yield event
            item = await anext(events, None)
        if shaper.include_usage:
            yield shaper.usage_chunk()
    except APIError as e:
        yield sse(e.body())
    yield DONE


def _bearer(token: str):
    """The dependency that refuses a call without `Authorization: Bearer <token>` (401)."""
    async def check(authorization: str | None = Header(None)) -> None:
        if not authorized(authorization, token):
            raise unauthorized()
    return check
