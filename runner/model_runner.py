"""Owns the model and the paged KV pool; executes one step plan at a time on the programs of `runner.programs`.

One forward program serves prefill, decode and mixed steps: which of the three a call is follows from the static
sizes in `StepBatch` (decode rows, prefill tokens), so each bucket combination compiles once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from runner import programs
from runner.batch_state import DecodeState
from runner.executor import StepInput, StepsExecutor
from runner.host_blocks import HostBlocks
from runner.kv_budget import fit_num_blocks, kv_bytes_per_block
from runner.model.config import ModelConfig
from runner.model.llama import Transformer
from runner.penalties import PenaltyRow
from runner.program_store import ModelPrograms, ProgramStore, signature
from runner.programs import FEED_ROWS, MIN_DECODE_STEPS, MIN_SWAP_BLOCKS
from runner.sampling import MODES, SamplingRow, SamplingTensors
from runner.step_batch import (
    DEFAULT_SHAPES,
    SeqChunk,
    StepBatch,
    StepShapes,
    bucket,
    padding_batch,
)

log = logging.getLogger(__name__)


class PendingStep:
    """A dispatched step: its samples on the device until `result()` copies the real chunks' rows to the host."""

    def __init__(self, out: Any, rows: np.ndarray, num_logprobs: int, prompt: tuple | None = None, steps: int = 1):
        self.out, self.rows, self.num_logprobs, self.steps = out, rows, num_logprobs, steps
        self.prompt = prompt  # (the prompt_logprobs program's outputs, their segments), or None

    def ready(self) -> bool:  # whether the step finished on the device: result() would not wait
        return all(x.is_ready() for x in jax.tree.leaves(self.out))

    def result(self) -> Any:
        out = jax.device_get(self.out)
        if self.steps > 1:  # [max_steps, rows]: the first num_steps are this dispatch's
            return out[:self.steps, self.rows]
        if not self.num_logprobs:
            return out[self.rows]
        out = jax.tree.map(lambda a: a[self.rows], out)
        if self.prompt is None:
            return out
        (token_logprobs, ranks, top_ids, top_logprobs), segments = jax.device_get(self.prompt[0]), self.prompt[1]
        tables: list[tuple | None] = [None] * len(self.rows)
        for i, at, n, k in segments:
            tables[i] = (token_logprobs[at:at + n], ranks[at:at + n], top_ids[at:at + n, :k],
                         top_logprobs[at:at + n, :k])
        return out._replace(prompt_logprobs=tables)


def on_device(device: jax.Device | None) -> contextlib.AbstractContextManager:
    """Makes `device` JAX's default device for the block (thread-local), so that arrays made there (loaded or
    random weights, the zeroed KV pool) are created on it rather than on the default device and copied; None
    changes nothing."""
    return contextlib.nullcontext() if device is None else jax.default_device(device)


class ModelRunner(StepsExecutor):
    host_blocks: HostBlocks | None = None  # the swap space (and host tier), once allocate_swap_space made it
    _last_samples: tuple[jax.Array, np.ndarray] | None = None  # the last step's FEED_ROWS tokens (device), rows

    def __init__(self, config: ModelConfig, params: dict[str, Any] | None, *, num_blocks: int | None = None,
                 block_size: int = 16, kernel_impl: str | None = None, release_params: bool = False,
                 memory_utilization: float = 0.9, cpu_kv_tokens: int = 65536,
                 shapes: StepShapes = DEFAULT_SHAPES, model: tuple[Any, Any] | None = None,
                 kv_pool: jax.Array | None = None, device: jax.Device | None = None,
                 program_store: ProgramStore | None = None):
        """num_blocks=None sizes the KV pool to the device memory left once the model is resident (see
        fit_num_blocks). release_params=True lets the model free the stacked weight arrays of `params` as it
        splits them per layer (the caller must not use `params` afterwards).

        Worker processes that share weights and pool with another process pass `model=(graphdef, state)` (see
        `abstract_model`) and `kv_pool` instead of `params`.

        `device` (None: JAX's default device) is where the weights and the pool are committed, so every jitted
        step and swap runs there; their per-step inputs are numpy arrays, which jit copies straight to that
        device. Params already there are not copied: load them under `on_device(device)`. `program_store` keeps
        the compiled forward programs across processes (runner.program_store); None leaves them to jit."""
        if (num_blocks is not None and num_blocks <= 0) or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
        if (params is None) == (model is None):
            raise ValueError("give either params or model=(graphdef, state)")
        self.config, self.block_size, self.shapes, self.device = config, block_size, shapes, device
        self._decode_state = DecodeState(block_size, shapes)
        with on_device(device):
            # Committed arrays make jit run on their device; device_put of an array already there copies nothing.
            if model is None:
                if device is not None:
                    params = jax.device_put(params, device)
                model = nnx.split(Transformer(config, params, kernel_impl, release_stacked=release_params))
            self.graphdef, self.state = model
            if device is not None:
                self.state = jax.device_put(self.state, device)
            self.dtype = jnp.dtype(jax.tree.leaves(self.state["embed"])[0].dtype)
            self.kernel_impl = nnx.merge(self.graphdef, self.state).kernel_impl
            self.model_def, self.weights = programs.ModelDef.split(self.graphdef, self.state)
            model_key = f"{config!r}|{self.kernel_impl}|{signature(self.weights)[1]}|{device}"
            self.programs = ModelPrograms(program_store, model_key, device)
            self._owns_pool = kv_pool is None
            if kv_pool is not None:
                self.num_blocks = kv_pool.shape[2]
                self.kv_pool = kv_pool if device is None else jax.device_put(kv_pool, device)
            else:
                self.num_blocks = num_blocks or fit_num_blocks(config, block_size, self.dtype, memory_utilization,
                                                               cpu_kv_tokens, device)
                self.kv_pool = self._zero_pool()
                # An allocation that fails surfaces here, not as every step's error.
                self.kv_pool.block_until_ready()
            # What a step that feeds on nothing reads. jit compiles apart for committed and uncommitted arguments,
            # so it must be placed as the samples a pipelined step feeds on (outputs of programs on the pool): a
            # worker's pool is committed, and an uncommitted one made its first pipelined step of each decode
            # size recompile after warm-up (3 s stalls of the 8B split's decode, RESULTS.md).
            no_feed = jnp.zeros(FEED_ROWS, jnp.int32, device=device)
            self._no_feed = jax.device_put(no_feed, self.kv_pool.sharding) if self.kv_pool.committed else no_feed

    @staticmethod
    def kv_pool_shape(config: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (config.num_layers, 2, num_blocks, config.num_kv_heads, block_size, config.head_dim)

    @staticmethod
    def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: Any) -> int:
        return kv_bytes_per_block(config, block_size, dtype)

    def dispatch(self, step: StepInput) -> "PendingStep":
        """Starts one step on the device and returns at once; `result()` waits for its samples. Feeds (see
        StepInput.feed) take tokens from the previous dispatch's samples on the device, with no host round trip."""
        decodes, prefills, sampling_rows = step.decodes, step.prefills, step.rows
        if len(sampling_rows) != len(decodes) + len(prefills):
            raise ValueError(f"{len(sampling_rows)} sampling rows for {len(decodes) + len(prefills)} chunks")
        if step.num_steps > 1:
            return self._dispatch_steps(step)
        batch, rows = self._decode_state.build(decodes, prefills)
        num_rows = batch.logits_indices.shape[0]
        if num_rows > FEED_ROWS:
            raise ValueError(f"{num_rows} logits rows in one step; at most {FEED_ROWS}")
        feed_src = np.full(batch.num_decode, -1, np.int32)
        pending_src = np.full(num_rows, -1, np.int32)  # the fed token of each logits row, for its penalties
        fed = self._feed(step, feed_src, pending_src, rows)
        prompt = self._prompt_rows(step, batch, rows) if step.prompt_logprobs else None
        sampled_rows = batch.logits_indices.shape[0]
        if prompt is not None:  # the prompt rows' logits too, after the sampled ones
            batch = batch.replace(logits_indices=np.concatenate([batch.logits_indices, prompt[0]]))
        logits, self.kv_pool = self.programs(programs.forward, self.model_def, self.weights, self.kv_pool, batch,
                                             fed, feed_src)
        if prompt is not None:
            prompt = (programs.prompt_logprobs(logits[sampled_rows:], prompt[1], prompt[2]), prompt[3])
            logits = logits[:sampled_rows]
        banned, allowed = step.late() if step.late is not None else (step.banned, step.allowed)
        st = self._sampling(step, rows, num_rows, banned, allowed)
        num_logprobs = step.num_logprobs or (1 if prompt else 0)  # prompt log-probs travel in a SampleResult
        out, fed = self.programs(programs.sample_step, logits, st, num_logprobs, fed, pending_src)
        self._last_samples = (fed, rows)
        return PendingStep(out, rows, num_logprobs, prompt)

    @staticmethod
    def _sampling(step: StepInput, rows: np.ndarray, num_rows: int, banned: Sequence[Sequence[int]] | None,
                  allowed: Sequence[np.ndarray | None] | None) -> SamplingTensors:
        """The step's sampling parameters on its logits rows (padding rows: None)."""
        padded: list[SamplingRow | None] = [None] * num_rows
        padded_banned: list[Sequence[int] | None] = [None] * num_rows
        padded_bias: list[Mapping[int, float] | None] = [None] * num_rows
        padded_penalties: list[PenaltyRow | None] = [None] * num_rows
        padded_allowed: list[np.ndarray | None] = [None] * num_rows
        for i, (r, row) in enumerate(zip(rows, step.rows)):
            padded[r] = row
            padded_banned[r] = banned[i] if banned else None
            padded_bias[r] = step.bias[i] if step.bias else None
            padded_penalties[r] = step.penalties[i] if step.penalties else None
            padded_allowed[r] = allowed[i] if allowed else None
        return SamplingTensors.from_rows(padded, padded_banned, bias=padded_bias, penalties=padded_penalties,
                                         allowed=padded_allowed)

    @staticmethod
    def _prompt_rows(step: StepInput, batch: StepBatch, chunk_rows: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, int, list] | None:
        """The token rows whose logits give step.prompt_logprobs and their targets, padded to a power of two (one
        program per bucket), the largest top count, and per chunk (chunk, first output row, rows, top count)."""
        rows: list[np.ndarray] = []
        targets: list[int] = []
        segments = []
        num_decodes = len(step.decodes)
        for i, spec in enumerate(step.prompt_logprobs or ()):
            if spec is None or not len(spec[2]):
                continue
            k, first, wanted = spec
            # A decode's token row is its logits row; a prefill's rows start at its segment.
            base = int(chunk_rows[i]) if i < num_decodes else (batch.num_decode
                                                                + int(batch.prefill_q_start[i - num_decodes]))
            segments.append((i, len(targets), len(wanted), k))
            rows.append(base + first + np.arange(len(wanted)))
            targets.extend(wanted)
        if not segments:
            return None
        size = bucket(len(targets), 16)
        indices = np.zeros(size, np.int32)
        indices[:len(targets)] = np.concatenate(rows)
        padded = np.zeros(size, np.int32)
        padded[:len(targets)] = targets
        return indices, padded, max(1, max(s[3] for s in segments)), segments

    def _dispatch_steps(self, step: StepInput) -> "PendingStep":
        """A multi-step decode (StepInput.num_steps > 1), its first tokens fed like a single step's."""
        for c in step.decodes:
            if len(c.block_table) * self.block_size < c.start_pos + step.num_steps:
                raise ValueError(f"block table of {len(c.block_table)} blocks cannot hold {step.num_steps} steps "
                                 f"from position {c.start_pos}")
        batch, rows = self._decode_state.build(step.decodes, [])
        padded: list[SamplingRow | None] = [None] * batch.num_decode
        for r, row in zip(rows, step.rows):
            padded[r] = row
        st = SamplingTensors.from_rows(padded)
        feed_src = np.full(batch.num_decode, -1, np.int32)
        fed = self._feed(step, feed_src, np.full(batch.num_decode, -1, np.int32), rows)
        out, fed, self.kv_pool = self.programs(programs.decode_steps, self.model_def, self.weights, self.kv_pool,
                                               batch, st, bucket(step.num_steps, MIN_DECODE_STEPS),
                                               np.int32(step.num_steps), fed, feed_src)
        self._last_samples = (fed, rows)
        return PendingStep(out, rows, 0, steps=step.num_steps)

    def _feed(self, step: StepInput, feed_src: np.ndarray, pending_src: np.ndarray, rows: np.ndarray) -> Any:
        """Points the fed decode rows at the previous dispatch's samples (in place); returns the buffer they are
        read from."""
        if not step.feed:
            return self._no_feed
        if self._last_samples is None:
            raise RuntimeError("a step feeds on the previous step's samples, but none was dispatched")
        fed, last_rows = self._last_samples
        for i, r in step.feed:
            feed_src[rows[i]] = pending_src[rows[i]] = last_rows[r]
        return fed

    def logits(self, decodes: Sequence[SeqChunk], prefills: Sequence[SeqChunk]) -> np.ndarray:
        """fp32 logits of each chunk's last token (decodes then prefills), writing the chunks' K/V."""
        batch, rows = self._decode_state.build(decodes, prefills)
        no_feed = np.full(batch.num_decode, -1, np.int32)
        logits, self.kv_pool = self.programs(programs.forward, self.model_def, self.weights, self.kv_pool, batch,
                                             self._no_feed, no_feed)
        return np.asarray(logits)[rows]

    def recover(self) -> bool:
        """After a failed step: forgets the samples a later step would feed on, and replaces a KV pool the failure
        left in error or deleted with a zeroed one. Returns whether the pool's contents were lost."""
        self._last_samples = None
        try:
            jax.block_until_ready(self.kv_pool)
            return False
        except Exception as e:  # the runtime's error, which every program reading the pool would raise again
            log.error("the KV pool is lost after a failed step (%s: %s); starting a zeroed one", type(e).__name__,
                      str(e).splitlines()[0] if str(e) else "")
        if not self._owns_pool:
            raise RuntimeError("the KV pool shared with other processes is lost after a failed step")
        self.kv_pool = None  # its memory, if it still holds any, is free before the new pool is made
        self.kv_pool = self._zero_pool()
        return True

    def _zero_pool(self) -> jax.Array:
        # Committed to its device even where the runner was given none: swap and host-tier copy-ins are committed
        # arrays, so a pool they are scattered into becomes committed, and jit compiles apart for committed and
        # uncommitted arguments: each copy bucket compiled again mid-serving after its warm-up (seen on CPU,
        # 2026-12-07), and, without a program store, every step shape.
        return jnp.zeros(self.kv_pool_shape(self.config, self.num_blocks, self.block_size), self.dtype,
                         device=self.device or jax.devices()[0])

    @property
    def block_bytes(self) -> int:
        return self.kv_bytes_per_block(self.config, self.block_size, self.dtype)

    def allocate_swap_space(self, num_blocks: int, run_from: int = 0, run: int = 1) -> None:
        """Host memory for num_blocks KV blocks, swapped out or the host tier's (runner.host_blocks)."""
        self.host_blocks = HostBlocks(num_blocks, self._block_shape(), self.dtype, next(iter(self.kv_pool.devices())),
                                      run_from, run)

    def _block_shape(self) -> tuple[int, ...]:
        """One block of the pool, the block axis dropped: [L, 2, Hkv, block_size, D]."""
        shape = self.kv_pool_shape(self.config, 1, self.block_size)
        return shape[:2] + shape[3:]

    @property
    def host_kv(self) -> np.ndarray | None:
        """The whole host memory as one array, laid out like the pool (tests and debugging: it waits for every
        copy-out)."""
        return None if self.host_blocks is None else self.host_blocks.read(range(self.host_blocks.num_blocks))

    def swap_blocks(self, swap_out: Sequence[tuple[int, int]], swap_in: Sequence[tuple[int, int]]) -> None:
        """Copies (device, host) block pairs out to host memory and (host, device) pairs back into the pool,
        dispatched before the caller's next step, none waited for. The copy-ins are taken before the copy-outs
        replace host blocks, and the split that feeds the copy-outs is dispatched before the scatter donates the
        pool (which stays in place), so it reads the blocks before the scatter writes."""
        if self.host_blocks is None:
            raise RuntimeError("no swap space: call allocate_swap_space first")
        src, dst = np.asarray(swap_in, np.int32).reshape(-1, 2).T
        dev, host = np.asarray(swap_out, np.int32).reshape(-1, 2).T
        copy_in = self.host_blocks.load(src, dst, self.num_blocks) if len(src) else None
        if len(dev):
            self.host_blocks.store(self.kv_pool, dev, host)
        if copy_in is not None:
            self.kv_pool = self.host_blocks.write(self.kv_pool, copy_in)

    def warmup_swap(self, max_blocks: int) -> int:
        """Compiles the swap transfers of every block-count bucket up to max_blocks (without running them);
        returns how many programs that is."""
        count, n = 0, MIN_SWAP_BLOCKS
        while n <= bucket(max_blocks, MIN_SWAP_BLOCKS):
            blocks = np.zeros(n, np.int32)
            values = (jax.ShapeDtypeStruct(self._block_shape(), self.dtype),) * n
            programs.split_blocks.lower(self.kv_pool, blocks).compile()
            programs.scatter_blocks.lower(self.kv_pool, blocks, values).compile()
            count, n = count + 2, n * 2
        return count + (self.host_blocks.warmup(self.kv_pool, max_blocks) if self.host_blocks is not None else 0)

    def warmup(self, max_decode_rows: int, max_prefill_tokens: int, max_blocks: int, *, mixed: bool = True,
               num_scheduler_steps: int = 1, threads: int | None = None) -> int:
        """Compiles the step programs of every padded size up to the limits, so that serving never stalls on a
        compilation; returns how many programs there are (see compile_steps)."""
        shapes = self.shapes
        decode = shapes.decode_sizes(max_decode_rows)
        prefill = shapes.prefill_sizes(max_prefill_tokens)
        pairs = [(d, 0) for d in decode] + [(0, p) for p in prefill]
        if mixed:
            pairs += [(d, p) for d in decode for p in prefill]
        steps = [(nd, tp, width) for width in shapes.table_widths(max_blocks) for nd, tp in pairs]
        sizes = [(nd, tp, width, 1) for nd, tp, width in steps]
        # A multi-step decode runs the program of its step count's bound (the shorter dispatches at the end of
        # requests too): each bound up to num_scheduler_steps, one below 9 steps.
        bounds = sorted({bucket(n, MIN_DECODE_STEPS) for n in range(2, num_scheduler_steps + 1)})
        sizes += [(nd, 0, width, b) for b in bounds for nd, tp, width in steps if nd and not tp]
        return self.compile_steps(sizes, threads)

    def compile_steps(self, sizes: Sequence[tuple[int, int, int, int]], threads: int | None = None,
                      modes: Sequence[str] = MODES) -> int:
        """Compiles the programs of steps of these padded sizes (decode rows, prefill tokens, block-table width,
        decode steps per dispatch: 1 is the forward pass, more the multi-step decode of that many steps or fewer),
        and the sampler of each logits row count, in each sampling mode of `modes` (serving needs every one; a
        profile only its greedy rows'); returns how many programs that is.

        XLA compiles on `threads` host threads at once (default: up to 8; it releases the GIL), which is what
        makes compiling an aggregated engine's mixed shapes ahead of time affordable: on the 8B shape each program
        takes seconds. Each program then runs once on an all-padding batch (writes nothing), which also checks it.
        """
        jobs = []  # (jitted function, its arguments): what serving will call, one per program
        for nd, tp, width, steps in dict.fromkeys(sizes):
            batch = padding_batch(nd, tp, width, self.shapes)
            no_feed = np.full(nd, -1, np.int32)
            if steps == 1:
                jobs.append((programs.forward, (self.model_def, self.weights, self.kv_pool, batch, self._no_feed,
                                                no_feed)))
            else:  # in each sampling mode, as the samplers below
                jobs += [(programs.decode_steps, (self.model_def, self.weights, self.kv_pool, batch,
                                                  SamplingTensors.from_rows([None] * nd).replace(mode=mode),
                                                  bucket(steps, MIN_DECODE_STEPS), np.int32(steps), self._no_feed,
                                                  no_feed))
                         for mode in modes]
        logits = self._compile_and_run(jobs, threads)
        # The sampler of each logits row count in each mode, on logits as the forward leaves them.
        samplers = [(programs.sample_step, (x, SamplingTensors.from_rows([None] * len(x)).replace(mode=mode), 0,
                                            self._no_feed, np.full(len(x), -1, np.int32)))
                    for x in logits.values() for mode in modes]
        self._compile_and_run(samplers, threads)
        return len(jobs) + len(samplers)

    def _compile_and_run(self, jobs: list[tuple[Any, tuple]], threads: int | None) -> dict:
        """Compiles the jobs on host threads (XLA releases the GIL), then runs each once, which also checks it;
        returns one logits output of each row count."""
        with concurrent.futures.ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            # A jitted call after lower().compile() of the same arguments reuses the compiled executable.
            compiled = list(pool.map(lambda job: self.programs.executable(job[0], *job[1]), jobs))
        stats = (self.device or jax.devices()[0]).memory_stats() or {}
        if "bytes_limit" in stats:  # a device that keeps no allocator statistics (CPU) has nothing to run out of
            programs.check_scratch([(programs.describe(*job), programs.scratch_bytes(c))
                                    for job, c in zip(jobs, compiled)],
                                   stats["bytes_limit"] - stats.get("bytes_in_use", 0))
        logits = {}
        for fn, args in jobs:
            if fn is programs.sample_step:
                self.programs(fn, *args)
                continue
            *out, self.kv_pool = self.programs(fn, *args[:2], self.kv_pool, *args[3:])
            if fn is programs.forward:
                logits.setdefault(out[0].shape[0], out[0])
        jax.block_until_ready(self.kv_pool)
        return logits
