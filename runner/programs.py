"""The device programs of a step: the model forward, the sampler, multi-step decode and the swap transfers.

Module-level jits keyed by the model's static half (`ModelDef`): runners of the same model share executables. The
weights travel as a flat list of arrays and the KV pool is donated, so XLA updates it in place instead of copying
gigabytes per step.

The forward and the sampler are separate programs, dispatched back to back: the forward compiles once per step
shape, the sampler once per (rows, mode), so the sampling modes multiply only the small program. The sampler
also writes its tokens into a fixed-size buffer (FEED_ROWS), which the next forward reads its fed decode tokens
from (the overlapped loop): one forward program serves every previous step's size. Neither program takes a branch
on the device (see runner.sampling), so a dispatch returns as soon as its kernels are queued.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from runner import program_store
from runner.sampling import SamplingTensors, sample
from runner.step_batch import StepBatch


class ModelDef:
    """The static half of a model: its nnx graph definition and the tree structure of its weights.

    jit hashes its static arguments on every call, and an nnx GraphDef hashes by walking the whole graph (0.6 ms
    for 32 layers on one core), as flattening an nnx State into its leaves walks it again (0.2 ms): per step, that
    was host time the GPU waited on. This object is hashed once, and the weights are passed as a plain list.
    """

    def __init__(self, graphdef: Any, treedef: Any):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    @classmethod
    def split(cls, graphdef: Any, state: Any) -> tuple[ModelDef, list[jax.Array]]:
        leaves, treedef = jax.tree.flatten(state)
        return cls(graphdef, treedef), leaves

    def merge(self, weights: list[jax.Array]) -> Any:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, weights))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, ModelDef) and self._hash == other._hash
                                 and self.graphdef == other.graphdef and self.treedef == other.treedef)


# Logits rows of the largest step (decode rows + prefill sequences) whose tokens a next step can be fed.
FEED_ROWS = 8192
# Swap transfers move block counts padded to powers of two from this floor: a few programs serve every swap.
MIN_SWAP_BLOCKS = 8
# The multi-step decode's bound on its step count (a power of two, at least this): a scheduler's step counts up to it
# share one program; only the loop's trip count differs.
MIN_DECODE_STEPS = 8


def _fed_tokens(batch: StepBatch, fed: jax.Array, feed_src: jax.Array) -> jax.Array:
    """The step's tokens with decode row i taken from fed[feed_src[i]] where feed_src[i] >= 0."""
    head = batch.tokens[:feed_src.shape[0]]
    return batch.tokens.at[:feed_src.shape[0]].set(jnp.where(feed_src >= 0, fed[jnp.maximum(feed_src, 0)], head))


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def forward(model: ModelDef, weights: list[jax.Array], kv_pool, batch: StepBatch, fed: jax.Array, feed_src: jax.Array):
    """Logits [rows, V] of the step and the updated pool. Decode row i with feed_src[i] >= 0 takes its token from
    fed[feed_src[i]] (the previous step's samples, on the device) instead of batch.tokens[i]."""
    return model.merge(weights)(kv_pool, batch.replace(tokens=_fed_tokens(batch, fed, feed_src)))


@functools.partial(jax.jit, static_argnums=(2,))
def sample_step(logits: jax.Array, sampling: SamplingTensors, num_logprobs: int, fed: jax.Array | None = None,
                pending_src: jax.Array | None = None):
    """The step's samples and the same tokens padded into a FEED_ROWS buffer for the next step's forward.
    Logits row i with pending_src[i] >= 0 was fed fed[pending_src[i]], an output token its penalties count (None:
    no row was fed)."""
    if sampling.penalty_ids.shape[1] and pending_src is not None:
        sampling = sampling.replace(pending=jnp.where(pending_src >= 0, fed[jnp.maximum(pending_src, 0)], -1))
    out = sample(logits, sampling, num_logprobs=num_logprobs)
    tokens = out.tokens if num_logprobs else out
    return out, jnp.zeros(FEED_ROWS, jnp.int32).at[:tokens.shape[0]].set(tokens)


@functools.partial(jax.jit, static_argnums=(2,))
def prompt_logprobs(logits: jax.Array, targets: jax.Array, num: int):
    """Per logits row [n, V]: the log-prob of its target token [n], its rank [n] (1: the most likely) and the top
    `num` (ids, log-probs) [n, num], under the raw distribution (as sampled tokens' log-probs)."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, num)
    target = jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
    rank = jnp.sum(logprobs > target[:, None], axis=-1, dtype=jnp.int32) + 1
    return target, rank, top_ids.astype(jnp.int32), top_logprobs


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(2,))
def decode_steps(model_def: ModelDef, weights: list[jax.Array], kv_pool, batch: StepBatch, sampling: SamplingTensors,
                 max_steps: int, num_steps: jax.Array, fed: jax.Array, feed_src: jax.Array):
    """num_steps (<= max_steps) decode steps in one device program: each step's samples are the next step's input
    tokens, and the first step's are fed as in `forward`. Returns the tokens [max_steps, rows] (rows past num_steps
    are zeros), the last step's samples in a FEED_ROWS buffer (what a next dispatch feeds on) and the pool.

    The host pays its per-step costs (planning, batch building, dispatch, transfer) once per num_steps tokens.
    The step count is an argument, not a shape: a scheduler shortens the last dispatch of requests near their
    max_tokens to any count, and a static count compiled a program per count (seconds each on an 8B, in serving).
    The loop is a fori_loop, so the weights are loop invariants (read in place) and the pool is an in-place carry.
    """
    model = model_def.merge(weights)
    rows = jnp.arange(batch.num_decode)
    block_size = kv_pool.shape[4]
    live = batch.decode_context_lens > 0

    def body(k, carry):
        kv, tokens, positions, out = carry
        slots = batch.decode_block_tables[rows, positions // block_size] * block_size + positions % block_size
        b = batch.replace(tokens=tokens, positions=positions, slot_mapping=jnp.where(live, slots, -1),
                          decode_context_lens=jnp.where(live, positions + 1, 0))
        logits, kv = model(kv, b)
        new = sample(logits, sampling.replace(step=sampling.step + k))
        return kv, new, positions + 1, out.at[k].set(new)

    out = jnp.zeros((max_steps, batch.num_decode), jnp.int32)
    first = _fed_tokens(batch, fed, feed_src)
    kv_pool, last, _, out = jax.lax.fori_loop(0, num_steps, body, (kv_pool, first, batch.positions, out))
    return out, jnp.zeros(FEED_ROWS, jnp.int32).at[:last.shape[0]].set(last), kv_pool


@jax.jit
def split_blocks(kv_pool, blocks):
    """K and V of each given block in every layer, one array per block: [L, 2, Hkv, block_size, D] each (what the
    host keeps per block, see runner.host_blocks)."""
    gathered = kv_pool[:, :, blocks]
    return tuple(gathered[:, :, i] for i in range(blocks.shape[0]))


@jax.jit
def split_runs(kv_pool, runs):
    """The blocks of each row of `runs` [k, run] as one array per row: [L, 2, run, Hkv, block_size, D] each (a whole
    host run, see nexus_jax.core.host_runs)."""
    return tuple(kv_pool[:, :, runs[i]] for i in range(runs.shape[0]))


@functools.partial(jax.jit, donate_argnums=(0,))
def scatter_runs(kv_pool, runs, values):
    """Writes run arrays into the pool: block j of values[i] to block runs[i, j]; entries naming block num_blocks
    (padding, and the blocks of a run nobody asked for) are dropped."""
    return kv_pool.at[:, :, runs.reshape(-1)].set(jnp.concatenate(values, axis=2), mode="drop")


@functools.partial(jax.jit, donate_argnums=(0,))
def scatter_blocks(kv_pool, blocks, values):
    """Writes one block array per entry of `blocks` into the pool. Padding entries name block num_blocks, past the
    pool's end, so mode="drop" skips them."""
    return kv_pool.at[:, :, blocks].set(jnp.stack(values, axis=2), mode="drop")


def compiled_programs() -> int:
    """How many forward and sampler programs this process has compiled or loaded from a program store (a test
    that serving compiles none)."""
    return forward._cache_size() + sample_step._cache_size() + program_store.programs_made


def pool_programs() -> int:
    """How many programs that donate the KV pool this process has compiled. Whether XLA updates the pool in
    place is fixed when a program is compiled, so a check of it is due only when this count grows."""
    return (forward._cache_size() + decode_steps._cache_size() + scatter_blocks._cache_size()
            + program_store.programs_made)


def scratch_bytes(compiled: Any) -> int:
    """Device memory a compiled program allocates when it runs, besides its arguments: its temporaries and the
    outputs that do not reuse a donated argument (0 where the backend does not say)."""
    m = compiled.memory_analysis()
    if m is None:
        return 0
    return m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def describe(fn: Any, args: tuple) -> str:
    """A step program and the padded shape it was compiled for, as an error message names it."""
    if fn is sample_step:
        return f"sampler of {args[0].shape[0]} rows ({args[1].mode})"
    batch = args[3]
    return (f"{fn.__name__} of {batch.num_decode} decode rows + {batch.num_prefill_tokens} prefill tokens, "
            f"tables of {batch.decode_block_tables.shape[1]} blocks")


def check_scratch(needs: Sequence[tuple[str, int]], free: int) -> None:
    """Raises MemoryError naming the program whose scratch (scratch_bytes) exceeds the `free` device bytes: it
    would fail with RESOURCE_EXHAUSTED the first time a step of that shape ran, mid-serving."""
    if not needs:
        return
    name, need = max(needs, key=lambda n: n[1])
    if need > free:
        gib = 2**30
        raise MemoryError(f"the step program {name} needs {need / gib:.2f} GiB of device memory when it runs, and "
                          f"{free / gib:.2f} GiB are left beside the weights and the KV pool: lower "
                          f"gpu_memory_utilization (or set num_kv_blocks) or max_num_batched_tokens")
