"""Host time of `LLMEngine.step()` spent on output processing (issue 15 item 4): detokenization, stop strings,
logprob token text and RequestOutput building, against the rest of the step (planning, the step input, the mock
executor, the token-level fold).

The engine runs over the MockExecutor with the embedded default model's tokenizer; every request decodes for the
whole run. Modes: "inline" (LLMEngine.step() callers: the processor runs in the step; "text" is the time in it) and
"threaded" (AsyncLLM's set-up: the processor has its own thread and the engine step is timed alone; "text" is then
the engine thread's time handing events over, waits on a full queue included). "e2e" is the wall time per step
until the last output was built (for threaded, until its thread has handled every event). Prints a table of median
microseconds per step. CPU only; no model runs.

    PYTHONPATH=. python benchmarks/bench_output_path.py [--steps 100] [--batches 64 256] [--device-ms 10]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Any, Callable

from nexus_jax.core.sampling_params import SamplingParams
from nexus_jax.core.tokenizer import Tokenizer
from nexus_jax.testing.engines import make_engine
from runner.model.default_model import default_model_dir

PROMPT = 16
STOP = ["\x00never", "zzqx"]  # scanned every token, never matched: the run's length stays fixed


class Timer:
    """Accumulates the wall time spent in the wrapped functions (outermost calls only)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._depth = 0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if not self._depth:
                    self.total += time.perf_counter() - start
        return timed


def _patch_text(engine: Any, timer: Timer) -> None:
    """Times the output processing of `engine`: its output processor's work where it has one."""
    processor = getattr(engine, "output", None)
    if processor is not None:
        for name in ("token", "progress", "retire", "flush"):
            setattr(processor, name, timer.wrap(getattr(processor, name)))
        return
    # Before the output processor: the stop checkers (they detokenize), logprob text and output building.
    import nexus_jax.core.engine as engine_module
    import nexus_jax.core.request as request_module
    import nexus_jax.core.stop as stop_module
    stop_module.StopChecker.step = timer.wrap(stop_module.StopChecker.step)
    engine_module.position_logprobs = timer.wrap(engine_module.position_logprobs)
    request_module.RequestGroup.output = timer.wrap(request_module.RequestGroup.output)


def run(tokenizer: Tokenizer, batch: int, steps: int, stream: bool, stop: bool, logprobs: bool,
        threaded: bool, device_s: float | None = None) -> tuple[float, float, float]:
    """(median step us, median text us per step, e2e us per step) over `steps` decode steps of `batch` requests."""
    vocab = tokenizer.backend.get_vocab_size()
    total = PROMPT + steps + 64
    engine = make_engine(num_blocks=batch * (total // 16 + 2), block_size=16, tokenizer=tokenizer,
                         max_model_len=total + 16, vocab_size=vocab, max_num_seqs=batch,
                         max_num_batched_tokens=batch * PROMPT, step_seconds=device_s)
    timer = Timer()
    processor = None
    if threaded:
        from nexus_jax.core.output_processor import ThreadedOutputProcessor
        processor = engine.output = ThreadedOutputProcessor(tokenizer, lambda view: None)
    _patch_text(engine, timer)
    params = SamplingParams(max_tokens=steps + 32, ignore_eos=True, stop=STOP if stop else None,
                            logprobs=5 if logprobs else None)
    for i in range(batch):
        start = (i * 7) % (vocab - PROMPT)
        engine.add_request(f"r{i}", {"prompt_token_ids": list(range(start, start + PROMPT))}, params, stream=stream)
    for _ in range(4):  # the prompts, and the overlapped loop's first landings
        engine.step()
    times, texts = [], []
    began = time.perf_counter()
    for _ in range(steps):
        before, start = timer.total, time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
        texts.append(timer.total - before)
    if processor is not None:
        processor.close()
    e2e = (time.perf_counter() - began) / steps
    return statistics.median(times) * 1e6, statistics.median(texts) * 1e6, e2e * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    # A simulated device step (the mock sleeps, releasing the GIL, as a device wait does): the host work hides
    # behind it, and the output thread runs while the engine thread waits.
    parser.add_argument("--device-ms", type=float, default=None)
    parser.add_argument("--modes", nargs="+", default=["inline", "threaded"], choices=["inline", "threaded"])
    args = parser.parse_args()
    tokenizer = Tokenizer.from_dir(default_model_dir())
    print("| mode | batch | stream | stop strings | logprobs | step us | text us | other us | text share | e2e us |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, batch, stream, stop, logprobs in itertools.product(args.modes, args.batches, (False, True),
                                                                 (False, True), (False, True)):
        step, text, e2e = run(tokenizer, batch, args.steps, stream, stop, logprobs, mode == "threaded",
                              None if args.device_ms is None else args.device_ms / 1e3)
        print(f"| {mode} | {batch} | {stream} | {stop} | {logprobs} | {step:.0f} | "
              f"{text:.0f} | {step - text:.0f} | {text / step:.0%} | {e2e:.0f} |", flush=True)


if __name__ == "__main__":
    main()
