"""Model parameters: load Hugging Face safetensors checkpoints, cache the converted params with orbax, or make
random ones. The parameter layout (stacked layers, fused qkv / gate_up, [in, out] weights) is the shared contract
described in .dev/HELPER_CONTEXT.md; `param_shapes` spells it out.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from runner.model.config import ModelConfig
from runner.model.hf_config import PHI3
from runner.model.hf_moe import MIXTRAL
from runner.model.safetensors_io import CheckpointReader, checkpoint_files, numpy_dtype

_CACHE_META = "nexus_params.json"


def param_shapes(config: ModelConfig) -> dict[str, Any]:
    """The params pytree with a shape tuple at each leaf."""
    h, i, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_layers
    qkv = config.q_size + 2 * config.kv_size
    layers = {"attn_norm": (n, h), "qkv": (n, h, qkv), "o": (n, config.q_size, h),
              "mlp_norm": (n, h), "gate_up": (n, h, 2 * i), "down": (n, i, h)}
    if config.qkv_bias:
        layers["qkv_bias"] = (n, qkv)
    if config.o_bias:
        layers["o_bias"] = (n, h)
    if config.mlp_bias:
        layers |= {"gate_up_bias": (n, 2 * i), "down_bias": (n, h)}
    if config.qk_norm:
        layers |= {"q_norm": (n, config.head_dim), "k_norm": (n, config.head_dim)}
    if config.sandwich_norm:
        layers |= {"post_attn_norm": (n, h), "post_mlp_norm": (n, h)}
    if config.num_experts:  # every layer's MLP is a mixture of experts, stacked [E, ...] per layer
        e, m = config.num_experts, config.moe_intermediate_size
        del layers["gate_up"], layers["down"]
        layers |= {"router": (n, h, e), "experts_gate_up": (n, e, h, 2 * m), "experts_down": (n, e, m, h)}
    if config.shared_expert_intermediate_size:
        s = config.shared_expert_intermediate_size
        layers |= {"shared_gate_up": (n, h, 2 * s), "shared_down": (n, s, h), "shared_gate": (n, h, 1)}
    shapes = {"embed": (v, h), "layers": layers, "final_norm": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (h, v)
    return shapes


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple)


class _Slot(NamedTuple):
    """Where one HF tensor goes: params[key] (or params["layers"][key][layer], or [layer][expert] for an expert's
    weight), from column `col` of the last axis."""
    key: str
    layer: int | None
    col: int
    transpose: bool  # HF Linear weights are [out, in]; ours are [in, out]
    hf_shape: tuple[int, ...]
    expert: int | None = None


def _slots(config: ModelConfig) -> dict[str, _Slot]:
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.q_size, config.kv_size
    slots = {"model.embed_tokens.weight": _Slot("embed", None, 0, False, (v, h)),
             "model.norm.weight": _Slot("final_norm", None, 0, False, (h,))}
    if not config.tie_word_embeddings:
        slots["lm_head.weight"] = _Slot("lm_head", None, 0, True, (v, h))
    for n in range(config.num_layers):
        p = f"model.layers.{n}."
        slots |= {
            p + "input_layernorm.weight": _Slot("attn_norm", n, 0, False, (h,)),
            p + "self_attn.o_proj.weight": _Slot("o", n, 0, True, (h, q)),
        }
        if not config.num_experts:
            slots[p + "mlp.down_proj.weight"] = _Slot("down", n, 0, True, (h, i))
        if config.sandwich_norm:  # Gemma: post_attention_layernorm norms the attention output, not the MLP input
            slots |= {p + "post_attention_layernorm.weight": _Slot("post_attn_norm", n, 0, False, (h,)),
                      p + "pre_feedforward_layernorm.weight": _Slot("mlp_norm", n, 0, False, (h,)),
                      p + "post_feedforward_layernorm.weight": _Slot("post_mlp_norm", n, 0, False, (h,))}
        else:
            slots[p + "post_attention_layernorm.weight"] = _Slot("mlp_norm", n, 0, False, (h,))
        if config.architecture == PHI3:  # already fused, in our order: q|k|v and gate|up
            slots |= {p + "self_attn.qkv_proj.weight": _Slot("qkv", n, 0, True, (q + 2 * kv, h)),
                      p + "mlp.gate_up_proj.weight": _Slot("gate_up", n, 0, True, (2 * i, h))}
        else:
            slots |= {p + "self_attn.q_proj.weight": _Slot("qkv", n, 0, True, (q, h)),
                      p + "self_attn.k_proj.weight": _Slot("qkv", n, q, True, (kv, h)),
                      p + "self_attn.v_proj.weight": _Slot("qkv", n, q + kv, True, (kv, h))}
        if config.num_experts:
            slots |= _expert_slots(config, n, p)
        elif config.architecture != PHI3:
            slots |= {p + "mlp.gate_proj.weight": _Slot("gate_up", n, 0, True, (i, h)),
                      p + "mlp.up_proj.weight": _Slot("gate_up", n, i, True, (i, h))}
        if config.qkv_bias:
            slots |= {p + "self_attn.q_proj.bias": _Slot("qkv_bias", n, 0, False, (q,)),
                      p + "self_attn.k_proj.bias": _Slot("qkv_bias", n, q, False, (kv,)),
                      p + "self_attn.v_proj.bias": _Slot("qkv_bias", n, q + kv, False, (kv,))}
        if config.o_bias:
            slots[p + "self_attn.o_proj.bias"] = _Slot("o_bias", n, 0, False, (h,))
        if config.mlp_bias:
            slots |= {p + "mlp.gate_proj.bias": _Slot("gate_up_bias", n, 0, False, (i,)),
                      p + "mlp.up_proj.bias": _Slot("gate_up_bias", n, i, False, (i,)),
                      p + "mlp.down_proj.bias": _Slot("down_bias", n, 0, False, (h,))}
        if config.qk_norm:
            d = config.head_dim
            slots |= {p + "self_attn.q_norm.weight": _Slot("q_norm", n, 0, False, (d,)),
                      p + "self_attn.k_norm.weight": _Slot("k_norm", n, 0, False, (d,))}
    return slots


def _expert_slots(config: ModelConfig, n: int, p: str) -> dict[str, _Slot]:
    """Layer n's router and per-expert tensors, each written into its expert's row of the stacked arrays."""
    h, m = config.hidden_size, config.moe_intermediate_size
    if config.architecture == MIXTRAL:  # w1 gate, w3 up, w2 down
        moe, gate, up, down = p + "block_sparse_moe.", "w1", "w3", "w2"
    else:
        moe, gate, up, down = p + "mlp.", "gate_proj", "up_proj", "down_proj"
    slots = {moe + "gate.weight": _Slot("router", n, 0, True, (config.num_experts, h))}
    for e in range(config.num_experts):
        x = f"{moe}experts.{e}."
        slots |= {x + gate + ".weight": _Slot("experts_gate_up", n, 0, True, (m, h), e),
                  x + up + ".weight": _Slot("experts_gate_up", n, m, True, (m, h), e),
                  x + down + ".weight": _Slot("experts_down", n, 0, True, (h, m), e)}
    if s := config.shared_expert_intermediate_size:
        x = moe + "shared_expert."
        slots |= {x + "gate_proj.weight": _Slot("shared_gate_up", n, 0, True, (s, h)),
                  x + "up_proj.weight": _Slot("shared_gate_up", n, s, True, (s, h)),
                  x + "down_proj.weight": _Slot("shared_down", n, 0, True, (h, s)),
                  moe + "shared_expert_gate.weight": _Slot("shared_gate", n, 0, True, (1, h))}
    return slots


# Where a checkpoint keeps its decoder and its output projection: a plain causal LM, then models that also take
# images (whose language model is served alone), as transformers 5 and 4.x save them.
_LAYOUTS = (("model.", "lm_head.weight"), ("model.language_model.", "lm_head.weight"),
            ("language_model.model.", "language_model.lm_head.weight"))


def _stored_names(slots: dict[str, _Slot], tensors: dict) -> dict[str, _Slot]:
    """`slots` keyed by the names this checkpoint stores them under."""
    for prefix, head in _LAYOUTS:
        if prefix + "embed_tokens.weight" in tensors:
            return {head if name == "lm_head.weight" else prefix + name.removeprefix("model."): slot
                    for name, slot in slots.items()}
    return slots


def _is_ignored(name: str, config: ModelConfig) -> bool:
    # Tied models read the output projection from the embedding, so a stored copy is redundant.
    return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name.endswith("lm_head.weight"))


def _check_tensors(tensors: dict, slots: dict[str, _Slot], config: ModelConfig) -> None:
    """Fail before any data is read: every required tensor present, with the config's shape and a readable dtype."""
    missing = [name for name in slots if name not in tensors]
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} required tensors: {shown}")
    for name, slot in slots.items():
        info = tensors[name]
        if info.shape != slot.hf_shape:
            raise ValueError(f"tensor {name} has shape {info.shape}, but the config expects {slot.hf_shape}")
        numpy_dtype(info, name)
    extra = sorted(name for name in tensors if name not in slots and not _is_ignored(name, config))
    if extra:
        warnings.warn(f"ignoring {len(extra)} checkpoint tensors the model does not use: {', '.join(extra[:10])}",
                      stacklevel=3)


@functools.partial(jax.jit, static_argnames="transpose", donate_argnums=0)
def _write(dest: jax.Array, src: jax.Array, lead: jax.Array, col: jax.Array, *, transpose: bool) -> jax.Array:
    """dest with src (converted to dest's layout and dtype) written in place at [*lead, ..., col:], where lead
    (layer, expert) indexes as many leading axes as dest has more than src."""
    update = (src.T if transpose else src).astype(dest.dtype)
    stacked = dest.ndim - update.ndim
    update = update.reshape((1,) * stacked + update.shape)
    starts = [lead[i] for i in range(stacked)] + [jnp.zeros((), jnp.int32)] * (dest.ndim - stacked)
    starts[-1] = col
    return jax.lax.dynamic_update_slice(dest, update, starts)


def _zeros(config: ModelConfig, dtype: Any) -> dict[str, Any]:
    return jax.tree.map(lambda shape: jnp.zeros(shape, dtype), param_shapes(config), is_leaf=_is_shape)


def load_hf_params(model_dir: str | Path, config: ModelConfig | None = None,
                   dtype: Any = jnp.bfloat16) -> dict[str, Any]:
    """Params from a Hugging Face directory (config.json + model.safetensors or index + shards).

    `config` defaults to the directory's config.json (which is read and validated either way). Tensors are
    read one at a time from memory-mapped files, converted on the device and written into preallocated
    stacked arrays, so host memory never holds more than the tensor in flight.
    """
    files = checkpoint_files(model_dir)
    file_config = ModelConfig.from_json(model_dir)
    config = config if config is not None else file_config
    with CheckpointReader(files) as reader:
        slots = _stored_names(_slots(config), reader.tensors)
        _check_tensors(reader.tensors, slots, config)
        params = _zeros(config, jnp.dtype(dtype))
        for name, slot in slots.items():
            parent = params["layers"] if slot.layer is not None else params
            src = jax.device_put(reader.read(name))
            lead = jnp.asarray([slot.layer or 0, slot.expert or 0], jnp.int32)
            parent[slot.key] = _write(parent[slot.key], src, lead, jnp.int32(slot.col), transpose=slot.transpose)
            # One tensor in flight at a time: `src` may alias the file mapping (CPU) or still be copying from
            # it (GPU), and the mapping must be free of both before the reader closes it.
            parent[slot.key].block_until_ready()
            del src
    return params


def _config_fields(config: ModelConfig) -> dict[str, Any]:
    # Through JSON so tuples and lists compare equal after a round trip.
    return json.loads(json.dumps(dataclasses.asdict(config)))


def save_params(params: dict[str, Any], path: str | Path, config: ModelConfig) -> None:
    """Save converted params with orbax under `path`, with the config they belong to next to them."""
    path = Path(path).absolute()
    # Drop the old marker first so an interrupted overwrite does not look complete.
    (path / _CACHE_META).unlink(missing_ok=True)
    import orbax.checkpoint as ocp  # here, not at the top: 0.2 s of every engine and worker process's start
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / "params", params, force=True)
        checkpointer.wait_until_finished()
    # Written last: its presence means the params are complete.
    (path / _CACHE_META).write_text(json.dumps({"config": _config_fields(config)}, indent=1))


def restore_params(path: str | Path, config: ModelConfig, dtype: Any = jnp.bfloat16) -> dict[str, Any]:
    """Params saved by `save_params`, as `dtype` on the default device; ValueError if saved for another config."""
    path = Path(path).absolute()
    meta = path / _CACHE_META
    if not meta.is_file():
        raise FileNotFoundError(f"no saved params at {path} (missing {meta})")
    saved, wanted = json.loads(meta.read_text())["config"], _config_fields(config)
    differ = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
    if differ:
        raise ValueError(f"params at {path} were saved for a different config; fields that differ: "
                         + ", ".join(f"{k} (saved {saved.get(k)!r}, wanted {wanted.get(k)!r})" for k in differ))
    # The default device as the caller set it (an engine placed on another device loads under
    # jax.default_device); jax.devices()[0] would stage a full copy of the weights on device 0.
    default_device = next(iter(jnp.zeros((), jnp.int8).devices()))
    sharding = jax.sharding.SingleDeviceSharding(default_device)
    target = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding),
                          param_shapes(config), is_leaf=_is_shape)
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path / "params", target)


def _cache_key(model_dir: Path, config: ModelConfig, dtype: Any) -> str:
    """Names a cache entry after everything the converted params depend on, so a stale entry is never reused."""
    sources = [model_dir / "config.json", *checkpoint_files(model_dir)]
    files = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sources]
    blob = json.dumps([str(model_dir.resolve()), files, _config_fields(config), jnp.dtype(dtype).name])
    return f"{config.architecture}-{jnp.dtype(dtype).name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def load_params(model_dir: str | Path, config: ModelConfig | None = None, dtype: Any = jnp.bfloat16,
                cache_dir: str | Path | None = None) -> dict[str, Any]:
    """`load_hf_params`, through a converted-params cache under `cache_dir` when one is given.

    Each entry is keyed by the model directory, its files' sizes and mtimes, the config and the dtype, so an
    entry that exists is valid; otherwise the HF files are converted and the entry is written.
    """
    if cache_dir is None:
        return load_hf_params(model_dir, config, dtype)
    model_dir = Path(model_dir)
    config = config if config is not None else ModelConfig.from_json(model_dir)
    entry = Path(cache_dir) / _cache_key(model_dir, config, dtype)
    if (entry / _CACHE_META).is_file():
        return restore_params(entry, config, dtype)
    params = load_hf_params(model_dir, config, dtype)
    save_params(params, entry, config)
    return params


def random_params(config: ModelConfig, dtype: Any = jnp.bfloat16, seed: int = 0) -> dict[str, Any]:
    """Random params generated on the device (nothing model-sized on the host): N(0, 0.02) weights, norms near 1.

    One program makes every leaf, kept in the program store where there is one: generating them leaf by leaf
    lowered a program per leaf shape at every start (0.77 s of an 8B warm start's 5.85 s on an H100,
    benchmarks/RESULTS.md), where loading a stored program takes a file read."""
    from runner.program_store import beside_compilation_cache

    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config), is_leaf=_is_shape)
    dtype = jnp.dtype(dtype)

    @jax.jit
    def generate(seed: jax.Array) -> list[jax.Array]:
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        out = []
        for key, (path, shape) in zip(keys, leaves):
            x = 0.02 * jax.random.normal(key, shape, jnp.float32)
            out.append((1.0 + x if path[-1].key.endswith("norm") else x).astype(dtype))
        return out

    seed_arg = jnp.asarray(seed, jnp.int32)
    store = beside_compilation_cache()
    if store is None:
        return jax.tree.unflatten(treedef, generate(seed_arg))
    program = store.executable("random_params", f"{config}|{dtype}", "", lambda: generate.lower(seed_arg))
    return jax.tree.unflatten(treedef, program(seed_arg))
