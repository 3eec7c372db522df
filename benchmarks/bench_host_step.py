"""Host time to build the decode part of a step: `build_step_batch` from the chunks' lists every step vs the
persistent rows of `runner.batch_state.DecodeState`, which copy only what changed (issue 15 item 2).

Each step every sequence advances one token (crossing a block boundary every 16th) and `changes` sequences leave
while as many new ones join. Prints a table of median microseconds per step. CPU only; no model runs.

    PYTHONPATH=. python benchmarks/bench_host_step.py [--steps 300] [--context 1024]
    PYTHONPATH=. python benchmarks/bench_host_step.py --engine   # the whole engine step, on the mock executor

`--engine` times `LLMEngine.step` in steady decode (batch 64 and 256, ~1K-token contexts, no constraints or
stops) on the MockExecutor, whose own dispatch time is measured apart and subtracted step by step (medians): what
the scheduler, the step's inputs and the fold of its outputs cost the host per step, all of which the overlapped
loop must hide.
"""

from __future__ import annotations

import argparse
import statistics
import time

from runner.batch_state import DecodeState
from runner.step_batch import DEFAULT_SHAPES, SeqChunk, build_step_batch

BLOCK = 16


class Batch:
    """`batch` running sequences with growing block tables; `changes` of them are replaced each step."""

    def __init__(self, batch: int, context: int):
        self.context, self.next_id, self.next_block = context, 0, 0
        self.seqs: dict[int, list] = {}
        for _ in range(batch):
            self.join()

    def join(self) -> None:
        blocks = self.context // BLOCK + 1
        self.seqs[self.next_id] = [self.context, list(range(self.next_block, self.next_block + blocks))]
        self.next_id, self.next_block = self.next_id + 1, self.next_block + blocks

    def step(self, changes: int) -> list[SeqChunk]:
        for sid in list(self.seqs)[:changes]:
            del self.seqs[sid]
            self.join()
        for seq in self.seqs.values():
            seq[0] += 1
            if seq[0] >= len(seq[1]) * BLOCK:
                seq[1].append(self.next_block)
                self.next_block += 1
        # The engine hands each chunk a copy of its table (BlockManager.block_table), in both variants.
        return [SeqChunk([7], pos, list(table), seq_id=sid) for sid, (pos, table) in self.seqs.items()]


def measure(batch: int, changes: int, steps: int, context: int, persistent: bool) -> float:
    seqs, state = Batch(batch, context), DecodeState(BLOCK, DEFAULT_SHAPES)
    times = []
    for _ in range(steps):
        chunks = seqs.step(changes)
        t = time.perf_counter()
        if persistent:
            state.build(chunks, [])
        else:
            build_step_batch(chunks, [], BLOCK)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def engine_step(batch: int, context: int, steps: int) -> tuple[float, float, float]:
    """Medians over steady-decode steps of (ms per engine step, ms of it in the mock executor's dispatch, ms of host
    work: the step less its dispatch). Per-step pairs, so each median of a part is below the step's."""
    from nexus_jax import SamplingParams
    from nexus_jax.testing.engines import make_engine

    engine = make_engine(num_blocks=batch * (context // BLOCK + 40), block_size=BLOCK,
                         max_model_len=context + steps + 128, max_num_seqs=batch, max_num_batched_tokens=8192)
    spent = [0.0]
    dispatch = engine.executor.dispatch

    def timed_dispatch(*args, **kwargs):
        t = time.perf_counter()
        try:
            return dispatch(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t
    engine.executor.dispatch = timed_dispatch
    for i in range(batch):
        engine.add_request(f"r{i}", {"prompt_token_ids": [3 + (j + i) % 500 for j in range(context)]},
                           SamplingParams(max_tokens=steps + 100, ignore_eos=True))
    while any(r.in_prefill for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    totals, mocks = [], []
    for _ in range(steps):
        spent[0] = 0.0
        t = time.perf_counter()
        engine.step()
        totals.append(time.perf_counter() - t)
        mocks.append(spent[0])
    median = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    return median(totals), median(mocks), median([t - m for t, m in zip(totals, mocks)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--engine", action="store_true", help="time the whole engine step instead")
    args = parser.parse_args()
    if args.engine:
        print("| batch | engine step ms | of it in the mock executor ms | host work ms |")
        print("|---|---|---|---|")
        for batch in (64, 256):
            total, mock, host = engine_step(batch, args.context, min(args.steps, 100))
            print(f"| {batch} | {total:.2f} | {mock:.2f} | {host:.2f} |")
        return
    print("| batch | changes/step | rebuild us | persistent us | ratio |")
    print("|---|---|---|---|---|")
    for batch in (8, 64, 256):
        for changes in (0, 1, 8):
            if changes > batch:
                continue
            old = measure(batch, changes, args.steps, args.context, persistent=False)
            new = measure(batch, changes, args.steps, args.context, persistent=True)
            print(f"| {batch} | {changes} | {old:.0f} | {new:.0f} | {old / new:.1f}x |")


if __name__ == "__main__":
    main()
