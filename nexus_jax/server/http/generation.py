"""Running one HTTP request's prompts on the engine: admission slots, the server's limits, the prompts' streams
merged, each completion accumulated, and the abort of everything when the client goes away.

Each prompt is one engine request and takes one of the server's max_in_flight slots until it ends, so the HTTP
server bounds the engine's queue as the gRPC server does. `Generation.close()` (idempotent) aborts what is still
running and frees the slots; the route calls it however the response ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from nexus_jax.core.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from nexus_jax.core.sampling_params import SamplingParams
from nexus_jax.entrypoints.async_llm import EngineDeadError
from nexus_jax.server.http.errors import APIError, bad_request, field_of
from nexus_jax.server.metrics import EngineMetrics
from nexus_jax.server.options import ServerOptions, check_limits

T = TypeVar("T")


class Admission:
    """The in-flight slots of the HTTP server, and whether it is draining (every new request then gets 503)."""

    def __init__(self, options: ServerOptions):
        self.options = options
        self.in_flight = 0
        self.draining = False

    def take(self, count: int) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", type="service_unavailable")
        if self.in_flight + count > self.options.max_in_flight:
            retry = str(max(1, math.ceil(self.options.retry_after_ms / 1000)))
            raise APIError(429, f"{self.in_flight} requests in flight, the server's limit is "
                           f"{self.options.max_in_flight}; retry later", type="rate_limit_exceeded",
                           code="rate_limit_exceeded", headers={"Retry-After": retry})
        self.in_flight += count

    def give_back(self, count: int) -> None:
        self.in_flight -= count


@dataclasses.dataclass
class Completion:
    """One completion accumulated from its deltas."""
    index: int
    text: list[str] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[PositionLogprobs] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, delta: CompletionOutput) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs or ())
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


class Generation:
    """A request's prompts running on the engine. Iterate `events()` for (prompt index, delta output) as they come;
    `completions[p][i]` accumulates prompt p's completion i, `prompt_tokens[p]` its prompt length."""

    def __init__(self, llm: Any, admission: Admission, metrics: EngineMetrics, prompts: list[Any],
                 params: SamplingParams, *, priority: int, program_id: str | None, thread_id: str,
                 prompt_param: str = "prompt", structured_param: str | None = None):
        """Takes one admission slot per prompt (APIError 429/503 when it cannot) and a 400 for a prompt over the
        server's limits; `prompt_param` names the field the prompts came from, in errors."""
        admission.take(len(prompts))
        self._admission, self._metrics, self._held = admission, metrics, len(prompts)
        self._prompt_param = prompt_param
        self._structured_param = structured_param  # the field structured output came in, for compile errors
        for prompt in prompts:
            try:
                check_limits(admission.options, prompt, params)
            except ValueError as e:
                self._release()
                param = field_of(str(e), {"max_tokens", "n"}) or prompt_param
                raise bad_request(str(e), param) from None
        base = uuid.uuid4().hex
        self.id = base
        self.prompt_tokens = [len(p.get("prompt_token_ids", ())) for p in prompts]
        self.cached_tokens = [0] * len(prompts)  # of each prompt, served from the prefix cache (either tier)
        self.completions = [{i: Completion(i) for i in range(params.n)} for _ in prompts]
        self.prompt_logprobs: list[list | None] = [None] * len(prompts)  # per prompt, once its prompt ran
        self._streams = [llm.generate(prompt, params, f"http-{base}-{p}", priority=priority, program_id=program_id,
                                      thread_id=thread_id) for p, prompt in enumerate(prompts)]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Deltas of every prompt, merged as they arrive; raises APIError for input the engine refused (400) or an
        engine that stopped (503)."""
        async for p, item in self._merged():
            if isinstance(item, BaseException):
                raise self._error(item)
            for c in item.outputs:
                self.completions[p][c.index].add(c)
            if item.prompt_logprobs is not None:
                self.prompt_logprobs[p] = item.prompt_logprobs
            self.cached_tokens[p] = max(self.cached_tokens[p], item.num_cached_tokens)
            if item.finished:
                self._observe(p, item)
                if item.error is not None:  # the engine failed running it (and kept serving the others)
                    raise APIError(500, f"generation failed: {item.error}", type="internal_server_error")
            yield p, item

    async def collect(self) -> Generation:
        """Runs every prompt to its end."""
        async for _ in self.events():
            pass
        return self

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput | BaseException]]:
        """(prompt index, output or the error that ended its stream) as they come. One prompt is read directly:
        a pump task and a queue would add two event-loop wake-ups to every token's way out."""
        if len(self._streams) == 1:
            try:
                async for out in self._streams[0]:
                    yield 0, out
            except Exception as e:
                yield 0, e
            return
        self._pumps = [asyncio.create_task(self._pump(p, s)) for p, s in enumerate(self._streams)]
        remaining = len(self._pumps)
        while remaining:
            p, item = await self._queue.get()
            if item is None:
                remaining -= 1
            else:
                yield p, item

    async def _pump(self, p: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await self._queue.put((p, out))
        except Exception as e:  # handed to the reader, which answers with it: a request never just stops
            await self._queue.put((p, e))
        finally:
            await self._queue.put((p, None))

    def _error(self, error: BaseException) -> APIError:
        """The engine validates a prompt (length, token ids) and the ids the sampling fields name as the request is
        added: a 400 naming the field."""
        if isinstance(error, EngineDeadError):
            return APIError(503, str(error), type="service_unavailable")
        if isinstance(error, (ValueError, TypeError)):
            named = field_of(str(error), {"logit_bias", "stop_token_ids", "allowed_token_ids", "bad_words"})
            if str(error).startswith("structured_outputs"):  # a grammar that does not compile
                named = self._structured_param or "structured_outputs"
            return bad_request(str(error), named or self._prompt_param)
        return APIError(500, f"generation failed: {error!r}", type="internal_server_error")

    def _observe(self, p: int, out: RequestOutput) -> None:
        """The metrics count whole completions; `out` holds the last deltas."""
        whole = [dataclasses.replace(c, token_ids=self.completions[p][c.index].token_ids) for c in out.outputs]
        self._metrics.observe(dataclasses.replace(out, outputs=whole))

    async def close(self) -> None:
        """Aborts the prompts still running (their KV is freed) and gives back the slots; safe to call twice."""
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for stream in self._streams:
            await stream.aclose()
        self._pumps, self._streams = [], []
        self._release()

    def _release(self) -> None:
        self._admission.give_back(self._held)
        self._held = 0


class ClientWatch:
    """Watches a request's client once its body was read (its ASGI receive then answers only on disconnect). One
    watcher task serves every wait of the request: one per wait cost ~0.1 ms of the first token's way out."""

    def __init__(self, receive: Callable[[], Awaitable[dict]]):
        self._gone = asyncio.ensure_future(_disconnect(receive))

    async def unless_gone(self, work: Awaitable[T]) -> T | None:
        """`work`'s result, or None once the client disconnects (`work` then is cancelled): the caller's cleanup
        then aborts the request."""
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait({task, self._gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return None if task.cancelled() else task.result()

    def close(self) -> None:
        self._gone.cancel()


async def _disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
