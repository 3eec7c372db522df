"""Offline batch inference over a JSONL file: `nexus-jax batch --input prompts.jsonl --output results.jsonl`.

Input lines: {"id": ..., "prompt": "..." | "prompt_token_ids": [...], <SamplingParams fields>}, optionally
"program_id" and "thread_id" (the agentic program the call belongs to, ranked by the program-aware policies as in
the library and gRPC; a line without one is a one-call program). Output lines (in
completion order): {"id", "text", "token_ids", "finish_reason", "stop_reason", "prompt_tokens", "ttft_s", "e2e_s"},
plus "outputs" with every completion when n > 1. A line that cannot run (bad JSON, no id, bad parameters, a
prompt the model rejects, an engine failure) becomes an error record {"line", "id", "error"} in the errors file and
the batch goes on; so does a line repeating an earlier line's id, on every run alike (only the first line of an
id runs). Results are flushed as requests finish, so a rerun with the same output skips the ids already there
(resume); a corrupt line in the output is reported and kept, and the valid lines after it still count. A run holds
an exclusive lock on its output, so a second run on the same output fails instead of writing every id again.
Lines are read through a grain MapDataset over a random-access JSONL source, and at most `max_in_flight`
requests are in the engine at once, so memory stays bounded by that window, not the file size (beyond 16 bytes
of line index and one id a line). A host memory guard stops admitting requests while the host's
available memory is under a floor, and stops the batch with HostMemoryError if it stays there with none in flight.
"""

from __future__ import annotations

import array
import dataclasses
import fcntl
import json
import os
import sys
import time
from typing import IO, Any

import grain

from nexus_jax.core.engine import LLMEngine
from nexus_jax.core.outputs import RequestOutput
from nexus_jax.core.sampling_params import SamplingParams

_PROMPT_KEYS = ("prompt", "prompt_token_ids")


@dataclasses.dataclass
class BatchSummary:
    lines: int = 0          # input lines read (blank lines excluded)
    completed: int = 0      # requests written to the output in this run
    skipped: int = 0        # ids already in the output (resume)
    errors: int = 0         # error records written
    generated_tokens: int = 0
    elapsed_s: float = 0.0
    memory_holds: int = 0   # engine steps taken without admitting new requests: host memory under the floor
    # 1-based numbers of complete output lines that are no result (kept in place; their ids, if any, run again)
    corrupt_output_lines: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Line:
    number: int             # 1-based line number in the input
    id: Any = None
    prompt: dict | None = None
    params: dict | None = None
    program: dict | None = None  # program_id / thread_id, when the line gives them
    error: str | None = None


class _JsonlSource:
    """Random access to a JSONL file's non-blank lines (grain's data source protocol) holding only offsets."""

    def __init__(self, path: str):
        self.path = path
        # Typed arrays: 16 bytes a line where a list of tuples takes about 128 (a 10M-line file: 160 MB, not 1.3 GB).
        self.numbers, self.offsets = array.array("q"), array.array("q")
        with open(path, "rb") as f:
            offset = 0
            for number, raw in enumerate(f, 1):
                if raw.strip():
                    self.numbers.append(number)
                    self.offsets.append(offset)
                offset += len(raw)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> tuple[int, bytes]:
        number, offset = self.numbers[i], self.offsets[i]
        with open(self.path, "rb") as f:
            f.seek(offset)
            return number, f.readline()


def _parse(item: tuple[int, bytes]) -> _Line:
    number, raw = item
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError) as e:  # also integers over Python's digit limit and too deep nesting
        return _Line(number, error=f"malformed JSON: {e}")
    if not isinstance(record, dict):
        return _Line(number, error=f"a line must be a JSON object, got {type(record).__name__}")
    rid = record.pop("id", None)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        return _Line(number, rid, error=f"id must be a string or an integer, got {rid!r}")
    given = [k for k in _PROMPT_KEYS if k in record]
    if len(given) != 1:
        return _Line(number, rid, error="a line needs exactly one of prompt or prompt_token_ids")
    program = {k: record.pop(k) for k in ("program_id", "thread_id") if k in record}
    return _Line(number, rid, {given[0]: record.pop(given[0])}, record, program)


def _done_ids(path: str) -> tuple[set, list[int]]:
    """Ids already in an output file, and the numbers of its corrupt complete lines. Only a torn last line (an
    interrupted run) is cut off, so appending stays valid: the lines after a corrupt one in the middle are results
    a run wrote, and dropping them would run those requests again and lose what they cost."""
    if not os.path.exists(path):
        return set(), []
    done, corrupt, keep = set(), [], 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break
            keep += len(raw)
            try:
                done.add(json.loads(raw)["id"])
            except (ValueError, RecursionError, KeyError, TypeError):  # also a JSON array, or an unhashable id
                if raw.strip():
                    corrupt.append(number)
    if keep != os.path.getsize(path):
        os.truncate(path, keep)
    return done, corrupt


def _result(rid: Any, out: RequestOutput) -> dict:
    first = out.outputs[0]
    m = out.metrics
    record = {"id": rid, "text": first.text, "token_ids": first.token_ids, "finish_reason": first.finish_reason,
              "stop_reason": first.stop_reason, "prompt_tokens": len(out.prompt_token_ids),
              "ttft_s": m.ttft if m else None, "e2e_s": m.e2e if m else None}
    if first.logprobs is not None:  # asked for: written, never dropped ({token id: log-prob} per position)
        record["logprobs"] = [_logprobs(p) for p in first.logprobs]
    if out.prompt_logprobs is not None:
        record["prompt_logprobs"] = [_logprobs(p) for p in out.prompt_logprobs]
    if len(out.outputs) > 1:
        record["outputs"] = [{"index": c.index, "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in out.outputs]
    return record


def _logprobs(position: dict | None) -> dict[str, float] | None:
    return None if position is None else {str(t): lp.logprob for t, lp in position.items()}


class _Progress:
    """One throttled status line on stderr: requests done and generated tokens/s."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.start, self.last = total, enabled, time.monotonic(), 0.0

    def show(self, s: BatchSummary, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < 0.2):
            return
        self.last = now
        rate = s.generated_tokens / max(now - self.start, 1e-9)
        print(f"\rbatch: {s.completed + s.skipped + s.errors}/{self.total} requests ({s.errors} errors), "
              f"{rate:.1f} tok/s", end="", file=sys.stderr, flush=True)


class HostMemoryError(MemoryError):
    """Available host memory stayed under the batch's floor with no request left to finish."""


class BatchError(ValueError):
    """A batch that must not start, with the reason for the person who ran it."""


class OutputLockedError(BatchError):
    """Another run holds the lock of the same output file."""


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a batch; `summary` counts what this run wrote before it (all flushed, so a rerun resumes)."""

    def __init__(self, summary: BatchSummary):
        super().__init__()
        self.summary = summary


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)  # hard links


def _check_paths(input_path: str, output_path: str, errors_path: str) -> None:
    """The errors file is rewritten each run and the output appended to: either one on another file of the
    batch would erase or mangle it (errors == output once cut 200 results to one line)."""
    files = (("input", input_path), ("output", output_path), ("errors file", errors_path))
    for i, (name_a, a) in enumerate(files):
        for name_b, b in files[i + 1:]:
            if _same_file(a, b):
                raise BatchError(f"the {name_a} and the {name_b} are the same file ({b}): the batch would "
                                 f"overwrite it; give the {name_b} another path")


def _lock_output(output_path: str) -> IO:
    """The output opened for appending, under an exclusive lock that the kernel releases when the process ends."""
    out_f = open(output_path, "a")
    try:
        fcntl.flock(out_f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        out_f.close()
        raise OutputLockedError(f"another batch run is writing {output_path} (it holds the file's lock): wait for "
                                "it to finish, or give this run another output") from None
    return out_f


def available_memory_mb(meminfo: str = "/proc/meminfo") -> float | None:
    """The kernel's MemAvailable estimate in MiB; None where it reports none (not Linux)."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _memory_low(floor_mb: float | None) -> float | None:
    """The available MiB when under the floor, else None."""
    if floor_mb is None:
        return None
    available = available_memory_mb()
    return available if available is not None and available < floor_mb else None


def _wait_for_memory(floor_mb: float, wait_s: float, output_path: str) -> None:
    """Nothing is in flight to free memory: waits up to wait_s for other processes to give some back, then
    refuses to go on (the results so far are flushed, so a rerun resumes)."""
    end = time.monotonic() + wait_s
    while (available := _memory_low(floor_mb)) is not None:
        if time.monotonic() >= end:
            raise HostMemoryError(
                f"host memory available ({available:.0f} MiB MemAvailable) stayed below the batch's floor of "
                f"{floor_mb:.0f} MiB (min_available_mb) for {wait_s:.0f} s with no request in flight; stopping. "
                f"Results so far are in {output_path}: rerun with the same output to resume.")
        time.sleep(min(0.5, max(end - time.monotonic(), 0.0)))


def run_batch(engine: LLMEngine, input_path: str, output_path: str, errors_path: str | None = None, *,
              defaults: dict[str, Any] | None = None, max_in_flight: int = 256,
              min_available_mb: float | None = 256.0, memory_wait_s: float = 30.0,
              progress: bool = True) -> BatchSummary:
    """Runs every line of input_path through `engine`, appending results to output_path and writing error
    records to errors_path (default: <output>.errors.jsonl, rewritten each run). defaults: SamplingParams
    fields that lines may override.

    Host memory guard: while MemAvailable is under min_available_mb (None: no guard) no new request is
    admitted, so the requests in flight finish and give their memory back; with none left in flight it waits
    up to memory_wait_s, then raises HostMemoryError.

    Raises BatchError when two of the input, output and errors file are one file, OutputLockedError while
    another run writes the same output, and BatchInterrupted (a KeyboardInterrupt) with the summary so far on
    Ctrl-C."""
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    if min_available_mb is not None and not min_available_mb >= 0:
        raise ValueError(f"min_available_mb must be >= 0 or None, got {min_available_mb}")
    if not memory_wait_s >= 0:
        raise ValueError(f"memory_wait_s must be >= 0, got {memory_wait_s}")
    if not os.path.exists(input_path):
        raise FileNotFoundError(f"batch input {input_path} does not exist")
    errors_path = errors_path or os.path.splitext(output_path)[0] + ".errors.jsonl"
    _check_paths(input_path, output_path, errors_path)
    start = time.monotonic()
    summary = BatchSummary()
    # Locked before the output is read (and its torn tail cut) or the errors file emptied: a second run on the
    # same output must change nothing of the first's.
    with _lock_output(output_path) as out_f:
        done, summary.corrupt_output_lines = _done_ids(output_path)
        lines = grain.MapDataset.source(_JsonlSource(input_path)).map(_parse)
        summary.lines = len(lines)
        bar = _Progress(len(lines), progress)
        try:
            with open(errors_path, "w") as err_f:
                _run(engine, iter(lines), done, out_f, err_f, summary, bar, defaults, max_in_flight,
                     min_available_mb, memory_wait_s, output_path)
        except KeyboardInterrupt as e:  # every finished result is already flushed: a rerun resumes from here
            summary.elapsed_s = time.monotonic() - start
            raise BatchInterrupted(summary) from e
    bar.show(summary, force=True)
    if progress:
        print(file=sys.stderr)
    summary.elapsed_s = time.monotonic() - start
    return summary


def _run(engine: LLMEngine, items, done: set, out_f: IO, err_f: IO, summary: BatchSummary, bar: _Progress,
         defaults: dict | None, max_in_flight: int, min_available_mb: float | None, memory_wait_s: float,
         output_path: str) -> None:
    seen: set = set()
    in_flight: dict[str, _Line] = {}

    def error(line: _Line, message: str) -> None:
        err_f.write(json.dumps({"line": line.number, "id": line.id, "error": message}) + "\n")
        summary.errors += 1

    exhausted = False
    while True:
        # Checked once per engine step: cheap, and admissions between two checks are bounded by the window.
        low = not exhausted and _memory_low(min_available_mb) is not None
        summary.memory_holds += low
        while not low and not exhausted and len(in_flight) < max_in_flight:
            line = next(items, None)
            if line is None:
                exhausted = True
            elif line.error is not None:
                error(line, line.error)
            elif line.id in seen:
                # Checked before the resume check, so a repeated id is an error on every run, never "skipped"
                # on a rerun only: the summaries of a first run and a resumed one add up the same.
                error(line, f"duplicate id {line.id!r}: an earlier line has it, and only the first line of an id runs")
            else:
                seen.add(line.id)
                if line.id in done:
                    done.discard(line.id)  # seen has it now: one copy of each id, not two
                    summary.skipped += 1
                else:
                    _submit(engine, line, defaults, in_flight, error)
        if not in_flight:
            if exhausted:
                break
            out_f.flush()
            err_f.flush()
            _wait_for_memory(min_available_mb, memory_wait_s, output_path)
            continue
        finished = [o for o in engine.step() if o.finished]
        for out in finished:
            _write(in_flight.pop(out.request_id), out, out_f, summary, error)
        if finished:
            out_f.flush()
            err_f.flush()
        bar.show(summary)


def _submit(engine: LLMEngine, line: _Line, defaults: dict | None, in_flight: dict, error) -> None:
    rid = f"batch-line-{line.number}"
    try:
        params = SamplingParams(**{**(defaults or {}), **line.params})
        engine.add_request(rid, line.prompt, params, **(line.program or {}))
    except (TypeError, ValueError) as e:
        error(line, str(e))
        return
    in_flight[rid] = line


def _write(line: _Line, out: RequestOutput, out_f: IO, summary: BatchSummary, error) -> None:
    if out.error is not None:  # an engine failure: not written as done, so a rerun retries it
        error(line, f"engine error: {out.error}")
        return
    out_f.write(json.dumps(_result(line.id, out)) + "\n")
    summary.completed += 1
    summary.generated_tokens += sum(len(c.token_ids) for c in out.outputs)
