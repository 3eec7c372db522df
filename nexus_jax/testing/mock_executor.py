"""A hand-computable executor (JetStream's idea), so the scheduler, the APIs and the servers are tested end to
end on CPU in milliseconds.

It keeps a fake KV pool of (token id, position) per slot and checks on every step that the cached prefix of each
chunk is really in the slots its block table names, so a wrong block table, prefix-cache hit or preemption raises
instead of passing silently. `context(chunk)` reads back the token ids a chunk's prefix holds, for tests to
compare. Swapped blocks move through a host copy of the same (token id, position) form, so `context` reads what a
swap restored.

`step_seconds` is the simulated device time of a step: steps run one after another on the simulated device, a
dispatched step's `result()` waits until it is done, and host work between `dispatch` and `result` overlaps it (as
on a GPU). With it, latencies are those of a (very small) real device and a request is still running when a test
acts on it. A step's samples are computed at dispatch; a later step's `feed` reads them, as a GPU's would.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from runner.executor import StepInput, StepsExecutor
from runner.sampling import SampleResult, SamplingRow
from runner.step_batch import SeqChunk


class MockExecutor(StepsExecutor):
    """The next token is (last token + 1) % vocab_size, skipping banned ids: a rule a test computes by hand."""

    def __init__(self, vocab_size: int = 1000, num_blocks: int = 256, block_size: int = 16,
                 step_seconds: float | None = None):
        self.vocab_size = vocab_size
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv = np.full(num_blocks * block_size, -1, np.int64)   # the token id whose K/V each slot holds
        self.pos = np.full(num_blocks * block_size, -1, np.int64)  # and that token's position
        self.num_steps = 0  # device steps (a multi-step decode counts each)
        self.num_dispatches = 0
        self.step_seconds = step_seconds  # None: no sleep at all (0.0 still sleeps, giving up the GIL)
        self.max_batch = 0  # the most chunks one step has had
        self.block_bytes = 16 * block_size  # an int64 token id and position per slot
        self.host_kv = self.host_pos = np.zeros((0, block_size), np.int64)
        self.device_free_at = 0.0  # when the simulated device finishes the last dispatched step
        self.last_tokens = np.zeros(0, np.int32)  # the last step's samples, in chunk order

    def dispatch(self, step: StepInput) -> "_Done":
        decodes, prefills, sampling_rows, banned, num_logprobs = (step.decodes, step.prefills, step.rows,
                                                                  step.banned, step.num_logprobs)
        if step.feed:  # the placeholders take the previous step's samples
            decodes = list(decodes)
            for i, r in step.feed:
                decodes[i] = SeqChunk([int(self.last_tokens[r])], decodes[i].start_pos, decodes[i].block_table)
        self.num_dispatches += 1
        done_at = None
        if self.step_seconds is not None:
            self.device_free_at = max(time.monotonic(), self.device_free_at) + self.step_seconds * step.num_steps
            done_at = self.device_free_at
        if step.num_steps > 1:
            return _Done(self._decode_steps(list(decodes), sampling_rows, step.num_steps), done_at)
        if step.late is not None:  # asked while the simulated forward pass runs, as the model runner does
            banned, _ = step.late()
        return _Done(self._run(decodes, prefills, sampling_rows, banned, num_logprobs), done_at)

    def _decode_steps(self, chunks: list[SeqChunk], sampling_rows: Sequence[SamplingRow], num_steps: int):
        out = []
        for _ in range(num_steps):
            tokens = self._run(chunks, [], sampling_rows, None, 0)
            out.append(tokens)
            chunks = [SeqChunk([int(t)], c.start_pos + 1, c.block_table) for c, t in zip(chunks, tokens)]
        return np.stack(out)

    def _run(self, decodes: Sequence[SeqChunk], prefills: Sequence[SeqChunk], sampling_rows: Sequence[SamplingRow],
             banned: Sequence[Sequence[int]] | None, num_logprobs: int):
        chunks = list(decodes) + list(prefills)
        self.max_batch = max(self.max_batch, len(chunks))
        if len(sampling_rows) != len(chunks):
            raise ValueError(f"{len(sampling_rows)} sampling rows for {len(chunks)} chunks")
        tokens = []
        for i, c in enumerate(chunks):
            table = np.asarray(c.block_table)
            pos = np.arange(c.start_pos + len(c.token_ids))
            slots = table[pos // self.block_size] * self.block_size + pos % self.block_size
            held = self.pos[slots[:c.start_pos]]
            if (held != pos[:c.start_pos]).any():
                bad = int(np.argmax(held != pos[:c.start_pos]))
                raise AssertionError(f"block table {c.block_table}: slot of position {bad} holds position {held[bad]}")
            self.kv[slots[c.start_pos:]] = c.token_ids
            self.pos[slots[c.start_pos:]] = pos[c.start_pos:]
            token = (c.token_ids[-1] + 1) % self.vocab_size
            while banned and token in banned[i]:
                token = (token + 1) % self.vocab_size
            tokens.append(token)
        self.num_steps += 1
        tokens = self.last_tokens = np.asarray(tokens, np.int32)
        if not num_logprobs:
            return tokens
        # A fixed distribution: the sampled token has log-prob log(1/2); the top list is tokens t, t+1, ...
        top = (tokens[:, None] + np.arange(num_logprobs)[None, :]) % self.vocab_size
        top_lp = np.log(0.5) * (1 + np.arange(num_logprobs))[None, :].repeat(len(tokens), 0)
        return SampleResult(tokens, np.full(len(tokens), np.log(0.5), np.float32), top.astype(np.int32),
                            top_lp.astype(np.float32))

    def allocate_swap_space(self, num_blocks: int, run_from: int = 0, run: int = 1) -> None:  # runs: one array
        self.host_kv = np.full((num_blocks, self.block_size), -1, np.int64)
        self.host_pos = np.full((num_blocks, self.block_size), -1, np.int64)

    def swap_blocks(self, swap_out: Sequence[tuple[int, int]], swap_in: Sequence[tuple[int, int]]) -> None:
        kv, pos = self.kv.reshape(self.num_blocks, -1), self.pos.reshape(self.num_blocks, -1)  # views
        src, dst = np.asarray(swap_in, np.int64).reshape(-1, 2).T
        incoming = self.host_kv[src], self.host_pos[src]  # copies, taken before swap-out writes the host
        dev, host = np.asarray(swap_out, np.int64).reshape(-1, 2).T
        self.host_kv[host], self.host_pos[host] = kv[dev], pos[dev]
        kv[dst], pos[dst] = incoming

    def context(self, chunk: SeqChunk) -> list[int]:
        """The token ids the fake pool holds for the chunk's cached prefix, in order."""
        table = np.asarray(chunk.block_table)
        pos = np.arange(chunk.start_pos)
        return self.kv[table[pos // self.block_size] * self.block_size + pos % self.block_size].tolist()


class _Done:
    """A mock step's result, available once the simulated device time `done_at` (None: at once) has passed."""

    def __init__(self, value, done_at: float | None):
        self.value, self.done_at = value, done_at

    def result(self):
        if self.done_at is not None:
            time.sleep(max(0.0, self.done_at - time.monotonic()))
        return self.value
