"""Output processing: each completion's text (detokenization, stop strings and their holdback), logprob token text,
token times, and the RequestOutputs, split from the engine's fold as in vLLM v1.

The engine's fold decides token-level stops (EOS, stop ids, length, min_tokens, a complete grammar: core/stop.py's
TokenStop), which free a sequence's blocks at once, and reports each appended token, each streamed request's
progress and each request's end (finish, abort, error) to the processor as events, in order.

`OutputProcessor` handles the events as they come, on the engine's thread: LLMEngine.step() returns what it built
in the same step, and a stop string ends its sequence within the token's fold, exactly as before the split.
`ThreadedOutputProcessor` (AsyncLLM's) handles them on its own thread, fed one batch per fold through a bounded
queue: when the queue is full the engine thread waits (backpressure; nothing is dropped). A stop string it matches
ends the completion there (its text cut, its tokens up to the one that completed the string, finish_reason "stop")
and, once every completion has ended, the request's final output goes out; tokens the engine sampled for it since
are dropped. The engine learns of the stop at its next fold (`stopped`) and frees the blocks then: a stop string
costs the engine the steps it ran meanwhile, at most the queue's depth plus the steps in flight.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Iterable

from nexus_jax.core.logprobs import position_logprobs
from nexus_jax.core.outputs import CompletionOutput, FinishReason, PositionLogprobs, RequestOutput
from nexus_jax.core.request import Request, RequestGroup
from nexus_jax.core.stop import StopResult, TextStop
from nexus_jax.core.tokenizer import IncrementalDetokenizer, Tokenizer

# A sampled token's (log-prob, top ids, top log-probs) as the sampler returned them.
TokenLogprobs = tuple[float, Any, Any]


@dataclasses.dataclass(eq=False)
class _Completion:
    """What the processor knows of one sequence's output: appended to only, so that a view reads a prefix."""
    index: int
    text: TextStop | None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    pieces: list[str] = dataclasses.field(default_factory=list)  # the text, as emitted: joined only when read
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class _Group:
    def __init__(self, group: RequestGroup, completions: list[_Completion]) -> None:
        self.group = group
        self.completions = completions
        self.done = False  # its final output went out: later events are dropped

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)


class OutputView:
    """A request's output as it stood at one event, built into a RequestOutput only when read: a stream's reader
    (AsyncLLM) that skips outputs costs nothing for them, and one that reads deltas copies only the new part."""

    def __init__(self, group: _Group, error: str | None) -> None:
        self._group = group
        self.request_id = group.group.request_id
        self.finished = group.finished
        self._error = error
        self._marks = [(len(c.token_ids), len(c.pieces), c.cumulative_logprob, c.finish_reason, c.stop_reason)
                       for c in group.completions]

    def build(self, sent: dict[int, tuple[int, int]] | None = None) -> RequestOutput:
        """The cumulative output, or with `sent` (completion index -> what earlier builds returned, updated here)
        only what is new since."""
        group = self._group.group
        first = group.seqs[0]  # the sequence that computes the whole prompt (the others may reuse its cache)
        outputs = []
        for c, (num_tokens, num_pieces, cumulative, finish, stop) in zip(self._group.completions, self._marks):
            tokens, pieces = (0, 0) if sent is None else sent.get(c.index, (0, 0))
            if sent is not None:
                sent[c.index] = (num_tokens, num_pieces)
            outputs.append(CompletionOutput(c.index, "".join(c.pieces[pieces:num_pieces]),
                                            c.token_ids[tokens:num_tokens], cumulative,
                                            None if c.logprobs is None else c.logprobs[tokens:num_tokens],
                                            finish, stop))
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outputs, self.finished,
                             first.metrics, self._error,
                             None if first.prompt_logprobs is None else list(first.prompt_logprobs),
                             first.num_cached_tokens)


class OutputProcessor:
    """Handles the engine's events on the engine's thread; `flush` returns the outputs they made."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._groups: dict[RequestGroup, _Group] = {}
        self._views: list[OutputView] = []

    def token(self, group: RequestGroup, seq: Request, token: int, logprobs: TokenLogprobs | None, now: float,
              result: StopResult) -> str | None:
        """A token appended to `seq` (of `group`) at `now`, with TokenStop's `result` for it; returns the stop
        string it completes, which ends `seq` (always None once the processor has a thread of its own)."""
        return self._token(group, seq, token, logprobs, now, result)

    def progress(self, group: RequestGroup) -> None:
        """A streamed request that is still running made progress."""
        self._progress(group, group.error)

    def retire(self, group: RequestGroup) -> None:
        """The engine is done with `group`: every sequence has finished (its own reasons, or abort or error)."""
        self._retire(group, [(s.finish_reason, s.stop_reason) for s in group.seqs], group.error)

    def flush(self) -> list[RequestOutput]:
        views, self._views = self._views, []
        return [view.build() for view in views]

    def stopped(self) -> list[tuple[Request, str, float]]:
        """Sequences a stop string ended since the last call, that the engine has not ended: (seq, string, when)."""
        return []

    # Pacing (the split's first token, see DisaggEngine): only a processor that streams on a thread of its own
    # withholds events; this one returns every output from flush, to a caller that does not stream.
    paces = False

    def hold(self, groups: Iterable[RequestGroup]) -> None:
        """Withholds the next flush's events of `groups` (those not retired in it) until `release`."""

    def release(self, group: RequestGroup, now: float) -> None:
        """Sends `group`'s withheld events with the next flush, its tokens stamped `now` (when they go out)."""

    def has_pending(self) -> bool:
        return bool(self._views)

    def _state(self, group: RequestGroup) -> _Group:
        state = self._groups.get(group)
        if state is None:
            state = self._groups[group] = _Group(group, [self._completion(seq) for seq in group.seqs])
        return state

    def _completion(self, seq: Request) -> _Completion:
        params = seq.params
        text = None if self.tokenizer is None else TextStop(params, IncrementalDetokenizer(
            self.tokenizer, skip_special_tokens=params.skip_special_tokens))
        logprobs = params.logprobs is not None
        return _Completion(seq.index, text, logprobs=[] if logprobs else None, cumulative_logprob=0.0 if logprobs
                           else None)

    def _token(self, group: RequestGroup, seq: Request, token: int, logprobs: TokenLogprobs | None, now: float,
               result: StopResult) -> str | None:
        state = self._state(group)
        c = state.completions[seq.index]
        if c.finish_reason is not None:  # a stop string ended it while the engine sampled on
            return None
        c.token_ids.append(token)
        seq.metrics.record_token(now)
        if logprobs is not None:
            token_logprob, top_ids, top_logprobs = logprobs
            c.logprobs.append(position_logprobs(token, token_logprob, top_ids, top_logprobs, seq.params.logprobs,
                                                self.token_text))
            c.cumulative_logprob += float(token_logprob)
        if c.text is not None:
            result = c.text.step(token, result)
            if result.text:
                c.pieces.append(result.text)
        if not result.finished:
            return None
        c.finish_reason, c.stop_reason = result.finish_reason, result.stop_reason
        matched = result.stop_reason if isinstance(result.stop_reason, str) else None
        if matched is not None:
            seq.metrics.finished_time = now
        self._ended(state, seq, matched, now)
        return matched

    def _ended(self, state: _Group, seq: Request, matched: str | None, now: float) -> None:
        """`seq` ended at a token (`matched`: the stop string that ended it); here the engine ends it at once, in
        the token's fold, and retires the request when it was the last."""

    def _progress(self, group: RequestGroup, error: str | None) -> None:
        state = self._state(group)
        if not state.done:
            self._views.append(OutputView(state, error))

    def _retire(self, group: RequestGroup, reasons: list[tuple[str | None, int | str | None]],
                error: str | None) -> None:
        state = self._groups.pop(group, None) or _Group(group, [self._completion(s) for s in group.seqs])
        if state.done:
            return
        for c, (reason, stop) in zip(state.completions, reasons):
            if c.finish_reason is None:  # ended by the engine alone: an abort, an error, a complete grammar
                c.finish_reason, c.stop_reason = reason, stop
        state.done = True
        self._views.append(OutputView(state, error))

    def token_text(self, token: int) -> str | None:
        """One token's own text for its logprobs (special tokens spelled out, as vLLM does); None without a
        tokenizer."""
        return None if self.tokenizer is None else self.tokenizer.decode([token], skip_special_tokens=False)


class ThreadedOutputProcessor(OutputProcessor):
    """The processor on a thread of its own, fed one batch of events per flush through a queue of `maxsize`
    batches; `deliver` gets every output view, on that thread."""

    def __init__(self, tokenizer: Tokenizer | None, deliver: Callable[[OutputView], None], maxsize: int = 4) -> None:
        super().__init__(tokenizer)
        self._deliver = deliver
        self._batch: list[tuple] = []
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._stopped: list[tuple[Request, str, float]] = []
        self._lock = threading.Lock()  # guards _stopped
        self._holding: set[RequestGroup] = set()  # whose events the next flush withholds
        self._held: dict[RequestGroup, list[tuple]] = {}  # withheld events, in order, until release
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nexus-jax-outputs", daemon=True)
        self._thread.start()

    paces = True

    def token(self, group: RequestGroup, seq: Request, token: int, logprobs: TokenLogprobs | None, now: float,
              result: StopResult) -> str | None:
        self.release(group, now)  # a withheld token never goes out after a later one
        self._batch.append((self._token, group, seq, token, logprobs, now, result))
        return None

    def progress(self, group: RequestGroup) -> None:
        self.release(group, time.monotonic())
        self._batch.append((self._progress, group, group.error))

    def retire(self, group: RequestGroup) -> None:
        self.release(group, time.monotonic())
        self._batch.append((self._retire, group, [(s.finish_reason, s.stop_reason) for s in group.seqs],
                            group.error))

    def hold(self, groups: Iterable[RequestGroup]) -> None:
        self._holding.update(groups)

    def release(self, group: RequestGroup, now: float) -> None:
        for fn, *args in self._held.pop(group, ()):
            if fn == self._token:  # (group, seq, token, logprobs, now, result): the token goes out now
                args[4] = now
            self._batch.append((fn, *args))

    def _withhold(self) -> None:
        holding, self._holding = self._holding, set()
        retired = {event[1] for event in self._batch if event[0] == self._retire}
        sent = []
        for event in self._batch:
            if event[1] in holding and event[1] not in retired:
                self._held.setdefault(event[1], []).append(event)
            else:
                sent.append(event)
        self._batch = sent

    def flush(self) -> list[RequestOutput]:
        if self._holding:
            self._withhold()
        if self._batch:
            batch, self._batch = self._batch, []
            self._put(batch)
        return []

    def stopped(self) -> list[tuple[Request, str, float]]:
        with self._lock:
            stopped, self._stopped = self._stopped, []
        return stopped

    def has_pending(self) -> bool:
        return bool(self._batch)

    def close(self) -> None:
        """Handles every event sent so far, then stops the thread (at once if it has failed)."""
        try:
            for group in list(self._held):
                self.release(group, time.monotonic())
            self.flush()
            self._put(None)
        except RuntimeError:  # the thread failed: the engine thread has raised (or will raise) its error
            pass
        self._thread.join()

    def _put(self, item: list[tuple] | None) -> None:
        while True:  # blocks while the queue is full, unless the thread has ended (it would never drain it)
            if self.error is not None:
                raise RuntimeError("the output processor's thread failed") from self.error
            if not self._thread.is_alive():
                raise RuntimeError("the output processor is closed")
            try:
                return self._queue.put(item, timeout=0.1)
            except queue.Full:
                continue

    def _ended(self, state: _Group, seq: Request, matched: str | None, now: float) -> None:
        if matched is not None:
            with self._lock:
                self._stopped.append((seq, matched, now))
        if state.finished:  # the engine may learn of a stop string only steps later: the request ends here
            state.done = True
            self._views.append(OutputView(state, state.group.error))

    def _run(self) -> None:
        try:
            while (batch := self._queue.get()) is not None:
                for fn, *args in batch:
                    fn(*args)
                views, self._views = self._views, []
                for view in views:
                    self._deliver(view)
        except BaseException as e:  # the engine thread raises it at its next flush, ending every stream
            self.error = e
