"""Step-latency measurements inside one process (which MPS may cap at an SM share), for `nexus_jax.disagg.profile`.

A `StepTimer` owns a ModelRunner on the model's weights (random ones for a preset) and times real steps through
`ModelRunner.step` (or `decode_steps`, per step): one warm-up, then the median of several timed runs, each
ending in the device_get of the sampled tokens. Block tables come from a cyclic allocator over a KV pool smaller
than the grid's total context: sequences of one step may share physical blocks, which changes no shape or
traffic (the pool is gigabytes, far beyond L2), and lets two 8B processes fit on one GPU. Every table of a kind
has the same padded width, because the attention kernels visit only each sequence's own context: prefix lengths
and decode contexts then vary without new compilations.

Run as `python -m runner.workers.profile_worker '<settings json>'`, it serves JSON-line commands on stdin (warmup,
measure, loop, quit) and answers on stdout with lines starting with MARK; progress goes to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import numpy as np

MARK = "@@profile "
Chunks = tuple[tuple[int, int], ...]   # (new_tokens, prefix_len) per sequence of one prefill step
DecodeSpec = tuple[int, int, int]      # (batch, min context, max context): contexts drawn uniformly


@dataclasses.dataclass(frozen=True)
class Grid:
    prefill: tuple[Chunks, ...]
    decode: tuple[DecodeSpec, ...]
    corun_prefill: tuple[Chunks, ...]            # measured while the partner loops `loop_decode`
    corun_decode: tuple[DecodeSpec, ...]         # measured while the partner loops `loop_prefill`
    mixed: tuple[tuple[DecodeSpec, Chunks], ...]  # aggregated steps, share 100 only
    loop_prefill: Chunks
    loop_decode: DecodeSpec
    repeats: int

    @classmethod
    def full(cls) -> "Grid":
        """Sized for Llama-3.1-8B on an H100 over 8 shares in under ~8 minutes (an estimate, not yet measured):
        14 step shapes to compile, 14 prefill and 20 decode points per share, 6 + 3 co-run points per share,
        3 mixed points at share 100."""
        singles = tuple(((n, p),) for p in (0, 2048, 8192) for n in (128, 512, 2048, 8192))
        multi = (((512, 0),) * 4, ((1024, 0), (2048, 4096)))
        decode = tuple((b, lo, hi) for b in (1, 16, 64, 128, 256)
                       for lo, hi in ((16, 512), (512, 2048), (2048, 4096), (16, 4096)))
        return cls(prefill=singles + multi, decode=decode,
                   corun_prefill=(((512, 0),), ((2048, 0),), ((2048, 2048),)),
                   corun_decode=tuple((b, lo, hi) for b in (16, 64, 256) for lo, hi in ((512, 2048), (2048, 4096))),
                   mixed=(((32, 512, 2048), ((512, 0),)), ((128, 512, 2048), ((2048, 0),)),
                          ((64, 2048, 4096), ((1024, 2048),))),
                   loop_prefill=((2048, 0),), loop_decode=(64, 512, 2048), repeats=3)

    @classmethod
    def quick(cls) -> "Grid":
        """Small enough for the tiny preset on a CPU in seconds (6 step shapes)."""
        singles = tuple(((n, p),) for p in (0, 64) for n in (16, 64))
        decode = tuple((b, lo, hi) for b in (1, 8) for lo, hi in ((8, 64), (64, 256), (8, 256)))
        return cls(prefill=singles + (((32, 0), (32, 32)),), decode=decode,
                   corun_prefill=(((64, 0),),), corun_decode=((8, 8, 64),),
                   mixed=(((8, 8, 64), ((64, 0),)),), loop_prefill=((64, 0),), loop_decode=(8, 8, 64), repeats=2)

    def max_prefill_tokens(self) -> int:
        return max(n + p for step in self.prefill + tuple(c for _, c in self.mixed) for n, p in step)

    def max_context(self) -> int:
        return max(hi for _, _, hi in self.decode + tuple(d for d, _ in self.mixed))


class BlockCycler:
    """Hands out KV blocks in a shuffled order, wrapping around the pool when it runs out (see module doc)."""

    def __init__(self, num_blocks: int, seed: int = 0):
        self._order = np.random.default_rng(seed).permutation(num_blocks).tolist()
        self._next = 0

    def table(self, tokens: int, block_size: int, width: int) -> list[int]:
        need = -(-tokens // block_size)
        if need > width or need > len(self._order):
            raise ValueError(f"{tokens} tokens need {need} blocks; the table width is {width}, "
                             f"the pool {len(self._order)}")
        out = [self._order[(self._next + i) % len(self._order)] for i in range(need)]
        self._next = (self._next + need) % len(self._order)
        return out + [0] * (width - need)


class StepTimer:
    def __init__(self, model: str, dtype: str, grid: Grid, *, kv_gib: float, decode_steps: int = 1,
                 block_size: int = 16, seed: int = 0, log: Callable[[str], None] | None = None):
        import jax

        from runner.model.loader import load_model
        from runner.model_runner import ModelRunner
        from runner.program_store import beside_compilation_cache
        from runner.sampling import GREEDY_ROW

        if decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {decode_steps}")
        self.grid, self.decode_steps, self.block_size = grid, decode_steps, block_size
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        loaded = load_model(model, dtype, seed=seed)
        self.model_name, self.vocab = loaded.name, loaded.config.vocab_size
        self.prefill_width = -(-grid.max_prefill_tokens() // block_size)
        self.decode_width = -(-(grid.max_context() + decode_steps) // block_size)
        per_block = ModelRunner.kv_bytes_per_block(loaded.config, block_size, loaded.params["embed"].dtype)
        num_blocks = max(int(kv_gib * 2**30 // per_block), self.prefill_width, self.decode_width)
        # Through the program store (GPUs): a warm profile's 35 programs were each traced in Python before JAX's
        # cache was consulted, 31 s of a 56 s profile on an H100; from the store they load without tracing.
        self.runner = ModelRunner(loaded.config, loaded.params, num_blocks=num_blocks, block_size=block_size,
                                  release_params=True, program_store=beside_compilation_cache())
        del loaded
        self.device = jax.devices()[0].device_kind
        self.blocks = BlockCycler(num_blocks, seed)
        self.rng = np.random.default_rng(seed)
        self.greedy = GREEDY_ROW

    def describe(self) -> dict[str, Any]:
        import jax
        return {"device": self.device, "model": self.model_name, "jax": jax.__version__,
                "kernels": self.runner.kernel_impl, "dtype": str(self.runner.dtype)}

    # ---- building steps ----
    def _prefill_chunks(self, chunks: Chunks) -> list:
        from runner.step_batch import SeqChunk
        return [SeqChunk(self.rng.integers(0, self.vocab, n).tolist(), p,
                         self.blocks.table(p + n, self.block_size, self.prefill_width)) for n, p in chunks]

    def _decode_chunks(self, spec: DecodeSpec) -> tuple[list, int]:
        """The decode chunks of a spec (contexts drawn from a generator seeded by the spec, so every process and
        every call sees the same ones) and the step's mean total context."""
        from runner.step_batch import SeqChunk
        batch, lo, hi = spec
        ctx = np.random.default_rng(list(spec)).integers(lo, hi + 1, batch)
        chunks = [SeqChunk([int(self.rng.integers(0, self.vocab))], int(c) - 1,
                           self.blocks.table(int(c) + self.decode_steps, self.block_size, self.decode_width))
                  for c in ctx]
        return chunks, int(ctx.sum() + batch * (self.decode_steps - 1) // 2)

    # ---- timing ----
    def _timed(self, run: Callable[[], Any], repeats: int) -> list[float]:
        run()  # warm-up (and the compilation of a new shape)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        return times

    def _run_prefill(self, chunks: Chunks) -> Callable[[], Any]:
        seqs = self._prefill_chunks(chunks)
        return lambda: self.runner.step([], seqs, [self.greedy] * len(seqs))

    def _run_decode(self, spec: DecodeSpec) -> tuple[Callable[[], Any], int]:
        seqs, sum_kv = self._decode_chunks(spec)
        if self.decode_steps == 1:
            return lambda: self.runner.step(seqs, [], [self.greedy] * len(seqs)), sum_kv
        return lambda: self.runner.decode_steps(seqs, [self.greedy] * len(seqs), self.decode_steps), sum_kv

    def _run_mixed(self, spec: DecodeSpec, chunks: Chunks) -> tuple[Callable[[], Any], int]:
        seqs, sum_kv = self._decode_chunks(spec)
        pre = self._prefill_chunks(chunks)
        return lambda: self.runner.step(seqs, pre, [self.greedy] * (len(seqs) + len(pre))), sum_kv

    def measure(self, what: str, share: int, partner: int | None = None) -> list[dict[str, Any]]:
        """what: solo (the prefill and decode grids), mixed, corun_decode or corun_prefill."""
        g, points, t0 = self.grid, [], time.perf_counter()
        corun = what.startswith("corun")
        prefill = {"solo": g.prefill, "corun_prefill": g.corun_prefill}.get(what, ())
        decode = {"solo": g.decode, "corun_decode": g.corun_decode}.get(what, ())
        base = {"share": share, "corun": corun, **({"partner_share": partner} if partner else {})}
        for chunks in prefill:
            times = self._timed(self._run_prefill(chunks), g.repeats)
            points.append({"kind": "prefill", **base, "chunks": [list(c) for c in chunks], "samples": times})
        for spec in decode:
            run, sum_kv = self._run_decode(spec)
            times = [t / self.decode_steps for t in self._timed(run, g.repeats + 2)]  # short: more repeats
            points.append({"kind": "decode", **base, "batch": spec[0], "sum_kv": sum_kv, "samples": times})
        for spec, chunks in g.mixed if what == "mixed" else ():
            run, sum_kv = self._run_mixed(spec, chunks)
            times = self._timed(run, g.repeats)
            points.append({"kind": "mixed", **base, "batch": spec[0], "sum_kv": sum_kv,
                           "chunks": [list(c) for c in chunks], "samples": times})
        for p in points:
            p["seconds"] = float(np.median(p["samples"]))
        self.log(f"[profile share {share}] {what}: {len(points)} points in {time.perf_counter() - t0:.1f}s: "
                 + ", ".join(f"{p['kind'][0]}{p.get('batch', '')}:{p['seconds'] * 1e3:.1f}ms" for p in points))
        return points

    def warmup(self) -> None:
        """Compiles every step shape of the grid on host threads at once (runner.compile_steps) and runs each
        once; in a profile under MPS the two workers of a pair do this at the same time."""
        from runner.sampling import GREEDY
        from runner.step_batch import build_step_batch

        g, steps = self.grid, []
        for chunks in g.prefill + g.corun_prefill + (g.loop_prefill,):
            steps.append(([], self._prefill_chunks(chunks), 1))
        for spec in g.decode + g.corun_decode + (g.loop_decode,):
            steps.append((self._decode_chunks(spec)[0], [], self.decode_steps))
        for spec, chunks in g.mixed:
            steps.append((self._decode_chunks(spec)[0], self._prefill_chunks(chunks), 1))
        sizes = []
        for decodes, prefills, n in steps:  # the padded sizes the runner gives these chunks
            batch = build_step_batch(decodes, prefills, self.block_size, self.runner.shapes)
            sizes.append((batch.num_decode, batch.num_prefill_tokens, batch.decode_block_tables.shape[1], n))
        self.log(f"[profile] compiling {self.runner.compile_steps(sizes, modes=(GREEDY,))} programs")

    def loop(self, kind: str, stop_file: str, started: Callable[[], None]) -> int:
        """Runs the grid's loop step of `kind` back to back until `stop_file` exists; returns the steps run."""
        if kind == "prefill":
            run = self._run_prefill(self.grid.loop_prefill)
        elif kind == "decode":
            run = self._run_decode(self.grid.loop_decode)[0]
        else:
            raise ValueError(f"loop kind must be prefill or decode, got {kind!r}")
        run()
        started()
        n = 1
        while not os.path.exists(stop_file):
            run()
            n += 1
        return n


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(settings: dict[str, Any]) -> None:
    grid = Grid(**{k: _tuples(v) if k != "repeats" else v for k, v in settings["grid"].items()})
    timer = StepTimer(settings["model"], settings["dtype"], grid, kv_gib=settings["kv_gib"],
                      decode_steps=settings["decode_steps"], seed=settings["seed"])
    share = settings["share"]
    emit({"ready": True, **timer.describe()})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "warmup":
            timer.warmup()
            emit({"done": True})
        elif cmd["op"] == "measure":
            emit({"points": timer.measure(cmd["what"], share, cmd.get("partner"))})
        elif cmd["op"] == "loop":
            emit({"steps": timer.loop(cmd["kind"], cmd["stop_file"], lambda: emit({"started": True}))})
        elif cmd["op"] == "quit":
            return
        else:
            raise ValueError(f"unknown profile worker command {cmd!r}")


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
