"""How much memory each step program asks for beyond its arguments, and which instructions hold it.

  PYTHONPATH=. python3 benchmarks/probe_step_memory.py [--out DIR] [--rows 16,64,80,272] [--vocab 128256]
  PYTHONPATH=. python3 benchmarks/probe_step_memory.py --forward [--model llama-3.1-8b] [--blocks 4096,8192]

At a full pool an engine ran out of memory asking for 34.46 GiB (H100, in `jit_sample_step`) and 71.29 GiB (H200,
in `jit_forward`, the dynamic split): sizes near a whole KV pool. Each program is compiled for this backend (not
run) on abstract arguments and its `memory_analysis()` printed: the sampler's (rows, mode) programs, or with
`--forward` the forward step at the largest decode, prefill and mixed shapes of serving (128 rows, 2048 tokens,
1024-block tables) on pools of `--blocks` sizes. A temp or output that grows with the pool means the program copies
the pool instead of updating it in place. The largest instruction outputs of the biggest program's optimized HLO
name the op.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from runner import programs
from runner.sampling import MODES, SamplingTensors

_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "u8": 1, "s8": 1, "pred": 1, "s64": 8, "u64": 8}
_SHAPE = re.compile(r"\b(f32|s32|u32|bf16|f16|u8|s8|pred|s64|u64)\[([\d,]*)\]")


def largest_outputs(hlo: str, top: int = 8) -> list[tuple[float, str]]:
    """The `top` instructions of an HLO text whose result shapes (tuples summed) are largest: (GiB, line)."""
    found = []
    for line in hlo.splitlines():
        if " = " not in line:
            continue
        result = line.split(" = ", 1)[1].split("(", 1)[0] if "(" in line else ""
        size = sum(_DTYPE_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                   for t, dims in _SHAPE.findall(line.split(" = ", 1)[1][:len(result) + 400].split(")")[0]))
        found.append((size / 2**30, line.strip()[:300]))
    return sorted(found, reverse=True)[:top]


def forward_programs(args: argparse.Namespace):
    """(name, compiled) of the forward step at serving's largest shapes on each pool size."""
    from runner.model.config import ModelConfig
    from runner.model_runner import ModelRunner
    from runner.step_batch import StepShapes, padding_batch
    from runner.workers.worker import abstract_model

    config = ModelConfig.preset(args.model)
    model_def, weights = programs.ModelDef.split(*abstract_model(config, "bfloat16", None))
    shapes = StepShapes(min_table_blocks=args.width)
    for blocks in (int(b) for b in args.blocks.split(",")):
        pool = jax.ShapeDtypeStruct(ModelRunner.kv_pool_shape(config, blocks, 16), jnp.bfloat16)
        for name, rows, tokens in (("decode", 128, 0), ("prefill", 0, args.tokens), ("mixed", 128, args.tokens)):
            if name not in args.shapes.split(","):
                continue
            batch = padding_batch(rows, tokens, args.width, shapes)
            no_feed = np.full(rows, -1, np.int32)
            fed = np.zeros(programs.FEED_ROWS, np.int32)
            compiled = programs.forward.lower(model_def, weights, pool, batch, fed, no_feed).compile()
            yield f"{name} {tokens} tok pool {blocks} blocks ({pool.size * 2 / 2**30:.2f} GiB)", compiled


def sampler_programs(args: argparse.Namespace):
    for rows in (int(r) for r in args.rows.split(",")):
        for mode in MODES:
            logits = jax.ShapeDtypeStruct((rows, args.vocab), jnp.float32)
            st = SamplingTensors.from_rows([None] * rows).replace(mode=mode)
            fed = np.zeros(programs.FEED_ROWS, np.int32)
            yield f"sampler rows {rows} {mode}", programs.sample_step.lower(
                logits, st, 0, fed, np.full(rows, -1, np.int32)).compile()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="16,64,80,272")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--forward", action="store_true", help="the forward step instead of the sampler")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--blocks", default="4096,8192", help="pool sizes (blocks of 16 tokens) for --forward")
    ap.add_argument("--shapes", default="decode,prefill,mixed", help="forward shapes to compile, of these three")
    ap.add_argument("--tokens", type=int, default=2048, help="prefill tokens of the prefill and mixed shapes")
    ap.add_argument("--width", type=int, default=1024, help="block-table width for --forward")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    print("device:", jax.devices()[0].device_kind)
    table, worst = [], (0, None)
    for name, compiled in (forward_programs if args.forward else sampler_programs)(args):
        m = compiled.memory_analysis()
        gib = {k: getattr(m, f"{k}_size_in_bytes", -1) / 2**30 if m is not None else -1
               for k in ("temp", "output", "argument", "alias")}
        table.append({"program": name, **{f"{k}_gib": v for k, v in gib.items()}})
        print(f"{name:40s} " + " ".join(f"{k} {v:8.3f}" for k, v in gib.items()) + " GiB", flush=True)
        if gib["temp"] > worst[0]:
            worst = (gib["temp"], compiled.as_text())
    result = {"device": jax.devices()[0].device_kind, "programs": table}
    if worst[1] is not None:
        result["largest_outputs"] = largest_outputs(worst[1])
        for gib, line in result["largest_outputs"]:
            print(f"{gib:8.3f} GiB  {line[:200]}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        kind = "forward" if args.forward else "sampler"
        (args.out / f"{kind}_memory.json").write_text(json.dumps(result, indent=1))
        if worst[1] is not None:
            (args.out / f"{kind}_largest.hlo.txt").write_text(worst[1])


if __name__ == "__main__":
    main()
