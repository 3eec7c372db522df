"""Which host block the host tier writes next: host blocks grouped in aligned runs, so that a context evicted in one
plan lands in whole runs, each moved as one array.

Why runs: the transfers cost per array, not only per byte. On an H100 host, 256 separate 2 MiB blocks took 39.7 ms
to come back to the device where the same bytes as one array took 10.9 ms (benchmarks/bench_host_tier.py,
RESULTS.md), which kept the restore of a 4K-token context at 2.5x faster than recomputing it.

A run written completely by one plan is *whole*: the executor keeps it as one array (runner.host_blocks), so its
blocks are not reusable one by one. They are reused only once every block of the run is released, and the host
cache evicts a whole run's blocks together (they were evicted from the device together, mostly one context). A run
written partly is *loose*: the executor keeps its blocks as one array each, and each free block is reused at once.
So the host memory never holds more than its blocks: a run is one array or at most `run` arrays of one block.
A tail shorter than a run is always loose.
"""

from __future__ import annotations

import heapq


class HostRuns:
    """Host blocks `first_block .. first_block + num_blocks - 1` in runs of `run` blocks."""

    def __init__(self, num_blocks: int, first_block: int = 0, run: int = 1):
        if isinstance(run, bool) or not isinstance(run, int) or run < 1:
            raise ValueError(f"a host run needs a positive number of blocks, got {run!r}")
        self.first_block, self.run = first_block, run
        full = num_blocks // run
        self._free_runs = list(range(full))  # every block free; a heap, low runs first
        self._loose: dict[int, list[int]] = {}  # run -> its free blocks, in loose runs and the tail
        if num_blocks % run:
            start = first_block + full * run
            self._loose[full] = list(range(start + num_blocks % run - 1, start - 1, -1))
        self._num_full = full
        self._live = [0] * (full + (num_blocks % run > 0))  # blocks taken and not released, per run
        self._whole: set[int] = set()
        self._open: list[int] = []  # the run being filled in order by this plan: its free blocks, next last
        self._written: dict[int, int] = {}  # run -> blocks taken by this plan
        self.num_used = 0

    def run_of(self, block: int) -> int:
        return (block - self.first_block) // self.run

    def blocks_of(self, run: int) -> range:
        start = self.first_block + run * self.run
        return range(start, start + self.run)

    def is_whole(self, run: int) -> bool:
        return run in self._whole

    def take(self) -> int | None:
        """A free host block for the plan being built: the next of the run it is filling, else the first block of
        a free run, else a free block of a loose run; None when every free block belongs to a whole run."""
        if not self._open and self._free_runs:
            self._open = list(reversed(self.blocks_of(heapq.heappop(self._free_runs))))
        if self._open:
            block = self._open.pop()
        elif self._loose:
            run = next(iter(self._loose))
            block = self._loose[run].pop()
            if not self._loose[run]:
                del self._loose[run]
        else:
            return None
        run = self.run_of(block)
        self._live[run] += 1
        self._written[run] = self._written.get(run, 0) + 1
        self.num_used += 1
        return block

    def release(self, block: int) -> None:
        """The block's data is no longer needed (evicted, or copied back to the device)."""
        run = self.run_of(block)
        self._live[run] -= 1
        self.num_used -= 1
        if run in self._whole:
            if not self._live[run]:
                self._whole.discard(run)
                heapq.heappush(self._free_runs, run)
        elif not self._live[run] and run < self._num_full:
            self._loose.pop(run, None)
            heapq.heappush(self._free_runs, run)
        else:
            self._loose.setdefault(run, []).append(block)

    def seal(self) -> None:
        """The plan's copies are dispatched: each full-length run it wrote completely is whole (the executor stores
        it as one array by the same rule); the rest of the run it was filling is free to take block by block."""
        for run, count in self._written.items():
            if count == self.run and run < self._num_full:
                self._whole.add(run)
        if self._open:
            self._loose.setdefault(self.run_of(self._open[0]), []).extend(self._open)
            self._open = []
        self._written = {}
