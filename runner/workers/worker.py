"""A model worker process: runs the step functions on weights and a KV pool it shares with other workers.

The first process (the holder) loads the model, moves the weights and a zeroed KV pool into shared arenas
(`runner.workers.shared_arena`: CUDA IPC on a GPU, POSIX shared memory on CPU) and publishes their handles; every other
worker maps the same memory, so N workers cost one copy of the weights and one KV pool. Workers differ only in
their SM share (the MPS environment they were started with), which is what the disaggregated engine picks.

On a GPU the jitted step donates the pool and XLA writes the new K/V in place, straight into the shared memory;
the worker checks after every step that the pool did not move. On CPU XLA does not write a donated external
buffer in place, so the CPU form copies the slots a step wrote back into shared memory before it replies (the
honest difference; the planning, the handover and the outputs are the same).

The holder itself runs no steps (it loads, publishes, and keeps the memory alive); the workers that run steps all
map the same arenas.

A worker replies to each request only after the step completed on the device, which is what makes a block table
safe to hand from the prefill worker to a decode worker. A decode worker may instead run its own loop
(runner.workers.decode_loop), which reports each completed step as an event, with the same ordering.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import traceback
from typing import Any, Callable, Sequence

from runner.executor import StepInput
from runner.step_batch import DEFAULT_SHAPES, SeqChunk, StepShapes
from runner.workers.decode_loop import DecodeLoop, start_thread
from runner.workers.messages import Admit, Execute, Expect, Extend, Info, Message, Release
from runner.workers.serve import Event, Reply, WorkerLost, serve
from runner.workers.timeline import Timeline

FD_ENV = "NEXUS_WORKER_FD"  # the inherited socket to the engine (see runner.workers.pool)


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    name: str
    model: str | None = None
    dtype: str = "auto"
    seed: int = 0
    params_cache_dir: str | None = None
    block_size: int = 16
    num_blocks: int | None = None
    memory_utilization: float = 0.9
    cpu_kv_tokens: int = 65536
    kernel_impl: str | None = None
    shapes: StepShapes = DEFAULT_SHAPES
    warmup: dict[str, Any] | None = None  # ModelRunner.warmup arguments, or None to compile lazily
    env: tuple[tuple[str, str], ...] = ()  # extra environment of the process
    reserve_bytes: int = 0                # holder: device memory left to the workers when sizing the KV pool
    decode_weights: str = "shared"        # holder: shared, private or auto (EngineConfig.decode_weights)
    weight_copiers: tuple[str, ...] = ()  # holder: the workers that may copy the weights, most useful first


@dataclasses.dataclass(frozen=True)
class SharedModel:
    """What a worker needs to map the holder's model: picklable handles, no arrays."""
    config: Any                 # runner.config.ModelConfig
    weights: Any                # ArenaHandle
    weight_specs: list[Any]     # TensorSpec per leaf of the model state, in tree order
    kv: Any                     # ArenaHandle
    kv_shape: tuple[int, ...]
    dtype: str
    kernel_impl: str
    private_workers: tuple[str, ...] = ()  # the workers that copy the weights (the holder left room for them)
    device_bytes: int = 0          # the device's memory, as the holder sized the pool from it (0: CPU)


# Device memory the holder leaves each step-running worker besides the shared weights and pool and its own weight
# copy: its CUDA/MPS context, XLA's workspace and the activations of the largest step (8B shape, budget 2048, peaks
# in use: 1.9-2.8 GiB per worker on an H100; on an H200 prefill 1.14 GiB, decode 1.12 GiB over its copy).
WORKER_RESERVE_BYTES = 3 << 30


def worker_memory_fraction(spec: WorkerSpec, shared: SharedModel) -> float | None:
    """The share of the device a worker's XLA allocator may grow to: its copy of the weights, if it has one, plus
    twice its reserve. Unbounded (XLA's default is 0.75 of the device), the allocator grows by regions of doubling
    size and may reserve up to twice what it holds: on an 80 GB H100 the decode worker's 16 GB copy then left no
    memory to load its programs (RESULTS.md, 2026-12-07 14:35 UTC). The bound stops that overshoot; twice the
    reserve keeps the headroom workers had over their measured peaks (1.1-2.8 GiB). None on CPU."""
    if not shared.device_bytes:
        return None
    copy = shared.weights.nbytes if spec.name in shared.private_workers else 0
    return min(1.0, (copy + 2 * WORKER_RESERVE_BYTES) / shared.device_bytes)


def worker_main(conn: Any, spec: WorkerSpec, shared: SharedModel | None) -> None:
    """Process entry point: build (or map) the model, then serve messages from `conn` until Stop."""
    try:
        worker = _Worker(spec, shared)
        conn.send(("ready", worker.shared))
    except BaseException as e:  # noqa: BLE001 - the parent must learn why the worker could not start
        conn.send(("error", f"worker {spec.name} failed to start: {type(e).__name__}: {e}\n"
                            f"{traceback.format_exc(limit=8)}"))
        return
    timeline = Timeline(spec.name)
    outbox: queue.Queue = queue.Queue()
    worker.emit = lambda value: outbox.put((Event(value), None))
    try:
        serve(conn, worker.start, timeline, outbox)
    finally:
        timeline.write()
    worker.close()


class _Worker:
    def __init__(self, spec: WorkerSpec, shared: SharedModel | None):
        import jax

        from runner.model_runner import ModelRunner
        from runner.program_store import beside_compilation_cache
        from runner.programs import pool_programs
        from runner.workers.shared_arena import SharedArena, import_arrays

        self.spec = spec
        self.runner = None
        self.step_failed = False  # a step's reply raised: its device outputs may be in error (see start)
        self.loop: DecodeLoop | None = None
        self.loop_thread: Any = None
        self.emit: Callable[[Any], None] = lambda value: None  # set by worker_main: sends an Event
        self.in_place = jax.devices()[0].platform == "gpu"
        if shared is None:
            # The holder only loads and keeps the arenas alive; it runs no steps, so the memory it used to load
            # (freed at once: it runs on the platform allocator) is not parked in an allocator pool.
            self.shared, self.arenas = _load_into_arenas(spec, "cuda" if self.in_place else "shm")
            return
        self.shared = shared
        weights, self.kv_arena = SharedArena.open(shared.weights), SharedArena.open(shared.kv)
        self.arenas = [weights, self.kv_arena]
        graphdef, abstract_state = abstract_model(shared.config, shared.dtype, shared.kernel_impl)
        state = jax.tree.unflatten(jax.tree.structure(abstract_state), import_arrays(weights, shared.weight_specs))
        self.private_weights = spec.name in shared.private_workers
        if self.private_weights:  # GEMMs on XLA's own memory, not the arena's IPC mapping (EngineConfig)
            state = jax.tree.map(lambda a: a.copy(), state)
        self.runner = ModelRunner(shared.config, None, block_size=spec.block_size, shapes=spec.shapes,
                                  model=(graphdef, state), kv_pool=self._pool_view(),
                                  program_store=beside_compilation_cache())  # a restarted worker skips tracing
        self.pool_pointer = self.runner.kv_pool.unsafe_buffer_pointer()
        self.pool_programs, self.checked_programs = pool_programs, -1
        if spec.warmup:
            self.warmup(spec.warmup)

    def _pool_view(self):
        return self.kv_arena.jax_array(0, self.shared.kv_shape, self.shared.dtype)

    # ---- operations (handle dispatches the messages)

    def start(self, message: Message) -> Reply | None:
        """Begins the message's work; the returned callable waits for it and returns the reply's value (None for
        the decode loop's messages, which get no reply: the loop reports through events).

        A step on the GPU is only dispatched here (after checking that its output pool is the shared memory,
        updated in place); its reply waits for its samples, so for its K/V, written by the same program.
        Everything else (the CPU form, which copies K/V into shared memory after each step) runs to the end here,
        in message order."""
        if isinstance(message, (Admit, Extend, Release, Expect)):
            self._decode_loop().post(message)
            return None
        if isinstance(message, Execute) and self.loop is not None and self.loop.rows:
            raise RuntimeError(f"worker {self.spec.name} runs a decode loop: its steps would break the loop's feeds")
        if isinstance(message, Execute) and self.in_place:
            if self.step_failed:  # its outputs on the device are in error: every step reading them would fail
                self.step_failed = False
                try:
                    self.runner.recover()
                except RuntimeError as e:  # the shared pool is lost here: the engine replaces this worker
                    raise WorkerLost(f"worker {self.spec.name}: {e}") from e
            pending = self.runner.dispatch(message.step)
            self._after_dispatch()
            return self._watched(pending.result)
        if isinstance(message, Execute):
            value = self.execute(message.step)
        elif isinstance(message, Info):
            value = self.info()
        else:
            raise TypeError(f"worker {self.spec.name} does not take a {type(message).__name__} message")
        return lambda: value

    def _watched(self, reply: Reply) -> Reply:
        """`reply`, noting when it fails (on the sender thread) so the next step recovers first."""
        def watched() -> Any:
            try:
                return reply()
            except Exception:
                self.step_failed = True
                raise
        return watched

    def _after_dispatch(self) -> None:
        # Reading a pool's address waits for the step that defines it (PJRT's external reference blocks on the
        # buffer's definition event), so it is read only after a new program ran: in-place donation is a property
        # of the compiled program. At dispatch, not in the reply: the next step donates this output pool.
        if self.in_place and self.pool_programs() != self.checked_programs:
            self._check_in_place(self.runner.kv_pool)
            self.checked_programs = self.pool_programs()

    def _decode_loop(self) -> DecodeLoop:
        """The loop, started on its first message; depth 1 on CPU, where each step's K/V is copied into shared
        memory (replacing the runner's pool) before the next step may run."""
        if self.loop is None:
            publish = (lambda chunks: None) if self.in_place else (lambda chunks: self._publish(chunks, 0))
            self.loop = DecodeLoop(self.runner, self.emit, depth=2 if self.in_place else 1, publish=publish,
                                   dispatched=self._after_dispatch)
            self.loop_thread = start_thread(self.loop)
        return self.loop

    def execute(self, step: StepInput) -> Any:
        out = self.runner.execute(step)
        self._publish([*step.decodes, *step.prefills], step.num_steps - 1)
        return out

    def warmup(self, kwargs: dict[str, Any]) -> int:
        count = self.runner.warmup(**kwargs)
        if not self.in_place:
            self.runner.kv_pool = self._pool_view()  # padding steps wrote nothing worth copying back
        return count

    def info(self) -> dict[str, Any]:
        import jax

        from runner.programs import compiled_programs
        return {"name": self.spec.name, "pid": os.getpid(), "device": str(jax.devices()[0]),
                "device_kind": jax.devices()[0].device_kind,
                "sm_percent": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
                "num_blocks": self.shared.kv_shape[2], "in_place": self.in_place, "holder": self.runner is None,
                "private_weights": self.runner is not None and self.private_weights,
                "compiled": compiled_programs(),  # step programs compiled so far: warm-up should leave none to do
                "memory": _memory_stats(jax.devices()[0])}

    def _publish(self, chunks: Sequence[SeqChunk], extra: int) -> None:
        """Makes the step's K/V visible to the other workers (device_get of the samples already waited for the
        step to finish). `extra`: decode positions written beyond each chunk's own tokens (multi-step)."""
        if self.in_place:
            self._check_in_place(self.runner.kv_pool)
            return
        import numpy as np

        bs = self.spec.block_size
        slots = []
        for c in chunks:
            table = np.asarray(c.block_table, np.int64)
            pos = np.arange(c.start_pos, c.start_pos + len(c.token_ids) + extra)
            slots.append(table[pos // bs] * bs + pos % bs)
        slots = np.concatenate(slots) if slots else np.zeros(0, np.int64)
        new = np.asarray(self.runner.kv_pool)
        shared = self.kv_arena.numpy(0, self.shared.kv_shape, self.shared.dtype)
        blocks, offsets = slots // bs, slots % bs
        shared[:, :, blocks, :, offsets, :] = new[:, :, blocks, :, offsets, :]
        self.runner.kv_pool = self._pool_view()

    def _check_in_place(self, pool: Any) -> None:
        if pool.unsafe_buffer_pointer() != self.pool_pointer:
            raise RuntimeError("XLA moved the shared KV pool instead of updating it in place")

    def close(self) -> None:
        if self.loop is not None:
            self.loop.post(None)
            self.loop_thread.join()
        self.runner = None
        for arena in self.arenas:
            arena.close()


def _memory_stats(device: Any) -> dict[str, int] | None:
    """XLA's allocator use on the device (what WORKER_RESERVE_BYTES must cover besides the arenas; `pool_bytes`:
    what it reserved); None where the platform keeps none (CPU)."""
    stats = device.memory_stats()
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit", "largest_alloc_size", "pool_bytes")
    return {k: int(stats[k]) for k in keys if k in stats} if stats else None


def _load_into_arenas(spec: WorkerSpec, kind: str) -> tuple[SharedModel, list[Any]]:
    """Loads the model, copies its state into a weight arena, frees the loaded copy, and sizes a zeroed KV
    pool arena from the device memory then free (or from spec.num_blocks / cpu_kv_tokens)."""
    import jax

    from runner.kv_budget import kv_blocks_in_budget
    from runner.model.loader import load_model
    from runner.model_runner import ModelRunner
    from runner.workers.shared_arena import SharedArena, export_arrays

    loaded = load_model(spec.model, spec.dtype, cache_dir=spec.params_cache_dir, seed=spec.seed)
    runner = ModelRunner(loaded.config, loaded.params, num_blocks=1, block_size=spec.block_size,
                         kernel_impl=spec.kernel_impl, release_params=True, shapes=spec.shapes)
    loaded.params = None
    leaves = jax.tree.leaves(runner.state)
    weights, specs = export_arrays(leaves, kind)
    dtype, kernel_impl, config = str(runner.dtype), runner.kernel_impl, loaded.config
    del leaves, runner
    per_block = ModelRunner.kv_bytes_per_block(config, spec.block_size, dtype)
    num_blocks = spec.num_blocks
    private = spec.weight_copiers if spec.decode_weights == "private" else ()
    weight_bytes = weights.handle.nbytes  # read here, not in the branch: CPU tests then run this line too
    total = 0
    if kind == "cuda":
        import cupy as cp
        free, total = cp.cuda.runtime.memGetInfo()
        private = _private_workers(spec, total, total - free, weight_bytes, per_block)
        copies = len(private) * weight_bytes
        if num_blocks is None:
            num_blocks = kv_blocks_in_budget(total, total - free, spec.memory_utilization,
                                             spec.reserve_bytes + copies, per_block)
    elif num_blocks is None:
        num_blocks = max(1, spec.cpu_kv_tokens // spec.block_size)
    kv_shape = ModelRunner.kv_pool_shape(config, num_blocks, spec.block_size)
    kv = SharedArena.create(num_blocks * per_block, kind)
    shared = SharedModel(config, weights.handle, specs, kv.handle, kv_shape, dtype, kernel_impl, private, total)
    return shared, [weights, kv]


def _private_workers(spec: WorkerSpec, total: int, used: int, weight_bytes: int, per_block: int) -> tuple[str, ...]:
    """The workers that get weight copies: with "private" every copier (an error if that leaves no KV pool); with
    "auto" the most useful copiers for which the pool keeps at least half the blocks it would have on shared
    weights (on an 80 GB H100, one copy of the 8B shape of three: the widest decode worker's)."""
    from runner.kv_budget import kv_blocks_in_budget

    copiers = spec.weight_copiers
    if spec.decode_weights == "shared" or not copiers:
        return ()
    if spec.decode_weights == "private":
        try:
            kv_blocks_in_budget(total, used, spec.memory_utilization,
                                spec.reserve_bytes + len(copiers) * weight_bytes, per_block)
        except ValueError as e:
            raise ValueError(f"decode_weights='private': {len(copiers)} weight copies of "
                             f"{weight_bytes / 2**30:.1f} GiB do not fit: {e}; or use decode_weights='shared' "
                             "or 'auto'") from e
        return copiers
    budget = total * spec.memory_utilization - used - spec.reserve_bytes
    n = len(copiers)
    while n and not (budget - n * weight_bytes >= max(budget / 2, per_block)):
        n -= 1
    return copiers[:n]


def abstract_model(config: Any, dtype: str, kernel_impl: str):
    """(graphdef, abstract state) of the model, built without allocating weights."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from runner.model.checkpoint import param_shapes
    from runner.model.llama import Transformer

    shapes = param_shapes(config)
    make = lambda: Transformer(config, jax.tree.map(  # noqa: E731
        lambda s: jnp.zeros(s, dtype), shapes, is_leaf=lambda x: isinstance(x, tuple)), kernel_impl)
    return nnx.split(nnx.eval_shape(make))


def main() -> None:
    from multiprocessing.connection import Connection

    conn = Connection(int(os.environ[FD_ENV]))
    spec, shared = conn.recv()
    worker_main(conn, spec, shared)


if __name__ == "__main__":
    # Through the module, not __main__, so that what this process pickles names runner.workers.worker's classes.
    from runner.workers.worker import main as module_main
    module_main()
