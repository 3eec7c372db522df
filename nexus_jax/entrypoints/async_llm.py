"""`AsyncLLM`: many concurrent streaming requests over one engine, for servers and async applications.

The engine runs on its own thread (a device step blocks for milliseconds, which must not stall the event loop).
Requests are validated on the caller's thread (text prompts on a worker thread: encoding a long text would stall
the event loop), so bad input raises right at `generate`, then handed to the engine thread through an inbox.
Output processing (text, stop strings, the outputs) runs on a thread of its own (ThreadedOutputProcessor), fed
by the engine thread through a bounded queue, off the engine's critical path; outputs travel from it through each
request's `_Latest`, which keeps only the newest (each output holds all before it), so a consumer that lags behind
holds one output, not one per step, and builds the RequestOutput it reads itself. A consumer that stops iterating
(break, cancellation, a dropped client) aborts its request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import threading
from typing import Any, AsyncIterator, Callable

from nexus_jax.core.config import EngineConfig
from nexus_jax.core.engine import LLMEngine
from nexus_jax.core.output_processor import OutputProcessor, OutputView, ThreadedOutputProcessor
from nexus_jax.core.outputs import RequestOutput
from nexus_jax.core.sampling_params import SamplingParams
from nexus_jax.entrypoints.build import build_engine


class EngineDeadError(RuntimeError):
    """The engine thread stopped; no request can make progress."""


class AsyncLLM:
    def __init__(self, engine: LLMEngine, *, max_queued_steps: int = 4):
        """max_queued_steps: the steps' output events that may wait for the output processor's thread before the
        engine thread waits for it (a stop string costs the engine up to that many wasted steps)."""
        self.engine = engine
        self._outputs = ThreadedOutputProcessor(engine.tokenizer, self._deliver_view, max_queued_steps)
        engine.output = self._outputs
        # ("add", group), ("abort", request_id) or ("call", (fn, loop, future))
        self._inbox: collections.deque = collections.deque()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, _Latest]] = {}
        self._lock = threading.Lock()   # guards _streams
        self._wake = threading.Event()
        self._stopped = False
        self._ids = itertools.count()
        self.dead_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nexus-jax-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLM":
        return cls(build_engine(config))

    async def generate(self, prompt: str | dict[str, Any], sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, *, priority: int = 0, delta: bool = True,
                       program_id: str | None = None, thread_id: str = "") -> AsyncIterator[RequestOutput]:
        """Streams the request's progress. With delta=True each output carries only the new text and token ids
        of each completion since the previous one (the last one has finished=True and the finish reason)."""
        if self.dead_error is not None:
            raise EngineDeadError(f"engine stopped: {self.dead_error!r}")
        request_id = request_id if request_id is not None else f"async-{next(self._ids)}"
        prepare = functools.partial(self.engine.prepare_request, request_id, prompt, sampling_params,
                                    priority=priority, stream=True, program_id=program_id, thread_id=thread_id)
        # Encoding text takes as long as the text is long; on a worker thread it stalls no other request.
        group = await asyncio.to_thread(prepare) if _needs_encoding(prompt) else prepare()
        queue = _Latest()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        if self.dead_error is not None:  # the thread stopped after the check above: it will never see this one
            with self._lock:
                self._streams.pop(request_id, None)
            raise EngineDeadError(f"engine stopped: {self.dead_error!r}")
        self._send(("add", group))
        sent: dict[int, tuple[int, int]] = {}  # completion index -> (token ids, text pieces) already yielded
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out.build(sent if delta else None)
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Aborts a request; its stream (if still read) ends with finish_reason "abort"."""
        self._send(("abort", request_id))

    async def run_on_engine(self, fn: Callable[[], Any]) -> Any:
        """fn() run on the engine thread between steps, for callers that change engine state the engine thread
        also walks (the process table, for one); returns its result or raises its exception."""
        if self.dead_error is not None:
            raise EngineDeadError(f"engine stopped: {self.dead_error!r}")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._send(("call", (fn, loop, future)))
        if self.dead_error is not None and not future.done():  # the thread stopped before it saw the call
            future.set_exception(EngineDeadError(f"engine stopped: {self.dead_error!r}"))
        return await future

    def shutdown(self) -> None:
        """Stops the engine thread; unfinished streams end with EngineDeadError."""
        self._stopped = True
        self._wake.set()
        self._thread.join()
        self.engine.close()

    def _send(self, item: tuple) -> None:
        self._inbox.append(item)
        self._wake.set()

    def _run(self) -> None:
        try:
            self._serve()
            self.dead_error = EngineDeadError("engine shut down")
        except BaseException as e:  # the loop must never die silently: every open stream learns why
            self.dead_error = e
        self._outputs.close()  # what the engine sent reaches its streams before they end
        self.engine.output = OutputProcessor(self.engine.tokenizer)  # the engine may serve LLM.generate next
        with self._lock:
            streams, self._streams = self._streams, {}
        dead = EngineDeadError(f"engine stopped: {self.dead_error!r}")
        for loop, queue in streams.values():
            _post(loop, queue.put, dead)
        while self._inbox:  # calls sent as the thread stopped would otherwise wait forever
            kind, arg = self._inbox.popleft()
            if kind == "call":
                _, loop, future = arg
                _post(loop, _resolve, future, None, dead)

    def _serve(self) -> None:
        engine = self.engine
        while not self._stopped:
            while self._inbox:
                kind, arg = self._inbox.popleft()
                if kind == "add":
                    try:
                        engine.add_prepared(arg)
                    except ValueError as e:
                        self._deliver(arg.request_id, e, True)
                elif kind == "call":
                    _settle(*arg)
                else:
                    engine.abort_request(arg)
            if not engine.has_unfinished_requests():
                self._wake.wait()
                self._wake.clear()
                continue
            engine.step()  # its outputs go out on the output processor's thread

    def _deliver_view(self, view: OutputView) -> None:
        self._deliver(view.request_id, view, view.finished)

    def _deliver(self, request_id: str, item: Any, last: bool) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if stream is not None and not _post(stream[0], stream[1].put, item) and not last:
            # The consumer's event loop closed without ending the stream: nobody reads it any more.
            with self._lock:
                self._streams.pop(request_id, None)
            self._send(("abort", request_id))


class _Latest:
    """One request's way from the engine thread to its reader, on the reader's event loop. Outputs are cumulative,
    so a newer one replaces one not yet read: a reader that lags (a client that stopped reading) costs one output's
    memory, and reads the progress it missed in one piece. An error is read after the output before it."""

    def __init__(self) -> None:
        self._output: OutputView | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item: OutputView | BaseException) -> None:
        if isinstance(item, BaseException):
            self._error = item
        else:
            self._output = item
        self._ready.set()

    async def get(self) -> OutputView | BaseException:
        await self._ready.wait()
        item: OutputView | BaseException | None
        if self._output is not None:
            item, self._output = self._output, None
        else:
            item, self._error = self._error, None
        if self._output is None and self._error is None:
            self._ready.clear()
        return item


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> bool:
    """fn(*args) on the loop's thread; False when the loop has closed (the engine thread must not die of a
    client that went away)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False


def _settle(fn: Callable[[], Any], loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
    try:
        result, error = fn(), None
    except Exception as e:  # the caller's exception, raised where it awaits
        result, error = None, e
    _post(loop, _resolve, future, result, error)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting caller was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _needs_encoding(prompt: Any) -> bool:
    return isinstance(prompt, str) or isinstance(prompt, dict) and "prompt_token_ids" not in prompt
