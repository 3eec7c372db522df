"""What the in-process engine's step programs ask for when compiled on first use, with serving's real arguments.

  PYTHONPATH=. python3 benchmarks/probe_first_step.py --out DIR [--budget 512] [--warmup] [--util 0.9]

At gpu_memory_utilization 0.9 without warm-up, every step of the 8B engine failed with `Out of memory while trying
to allocate 71.29GiB` (the pool's size) in jit_forward/jit_sample_step (H200, 2026-12-07, budgets 512 and 2048),
while programs compiled by warm-up alias the pool (probe_step_memory.py, and serving at 0.9 with warm-up ran).
This wraps `runner.programs.forward` and `sample_step`: on each new argument signature it compiles the program for
the arguments the runner really passes and records its memory_analysis (temp, output, alias) and how the donated
pool argument is placed (committed, sharding, layout), then runs the call as usual. It serves a few short prompts
and writes what it saw to DIR/first_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # as bench_split_decode.py runs the engine

import jax  # noqa: E402

from nexus_jax import LLM, SamplingParams  # noqa: E402
from runner import programs  # noqa: E402

GIB = 2**30
SEEN: list[dict] = []


def describe_array(x: Any) -> dict:
    if not isinstance(x, jax.Array):
        return {"type": type(x).__name__}
    info = {"shape": list(x.shape), "committed": bool(getattr(x, "committed", False)), "sharding": str(x.sharding)}
    fmt = getattr(x, "format", None)
    info["format"] = str(fmt) if fmt is not None else None
    return info


class Watched:
    """Calls `fn` as usual; the first time each argument signature is seen, compiles it and records its memory."""

    def __init__(self, fn: Any, pool_arg: int | None):
        self.fn, self.pool_arg, self.keys = fn, pool_arg, set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fn, name)

    def __call__(self, *args: Any) -> Any:
        leaves = jax.tree_util.tree_leaves(args)
        key = tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x))),
                     bool(getattr(x, "committed", False))) for x in leaves)
        if key not in self.keys:
            self.keys.add(key)
            record: dict[str, Any] = {"program": self.fn.__name__, "free_gib_before": free_gib()}
            try:
                compiled = self.fn.lower(*args).compile()
                m = compiled.memory_analysis()
                record.update({k: getattr(m, k) / GIB for k in ("temp_size_in_bytes", "output_size_in_bytes",
                                                                "alias_size_in_bytes", "argument_size_in_bytes")})
                record["scratch_gib"] = programs.scratch_bytes(compiled) / GIB
                formats = getattr(compiled, "input_formats", None)
                if self.pool_arg is not None:
                    record["pool_arg"] = describe_array(args[self.pool_arg])
                    if formats is not None:
                        record["pool_expected_format"] = str(jax.tree_util.tree_leaves(formats)[
                            len(jax.tree_util.tree_leaves(args[1:self.pool_arg]))])
            except Exception as e:  # noqa: BLE001 - recorded: the probe is about what fails
                record["compile_error"] = f"{type(e).__name__}: {e}"[:400]
            print(json.dumps(record), flush=True)
            SEEN.append(record)
        return self.fn(*args)


def free_gib() -> float:
    s = jax.devices()[0].memory_stats() or {}
    return (s.get("bytes_limit", 0) - s.get("bytes_in_use", 0)) / GIB


programs.forward = Watched(programs.forward, pool_arg=2)
programs.sample_step = Watched(programs.sample_step, pool_arg=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--util", type=float, default=0.9)
    ap.add_argument("--warmup", action="store_true")
    ap.add_argument("--cache", default="/tmp/nexus-jax-cc-probe")
    args = ap.parse_args()
    tiny = args.model == "tiny"
    llm = LLM(None if tiny else args.model, gpu_memory_utilization=args.util, max_num_batched_tokens=args.budget,
              max_num_seqs=64, max_model_len=2048 if tiny else 8192, enable_prefix_caching=False,
              warmup=args.warmup, compilation_cache_dir=args.cache)
    runner = getattr(llm.llm_engine.executor, "runner", llm.llm_engine.executor)
    result: dict[str, Any] = {"args": vars(args), "free_gib_after_build": free_gib(),
                              "allocator_after_build": {k: v / GIB for k, v in
                                                        (jax.devices()[0].memory_stats() or {}).items()},
                              "pool": describe_array(getattr(runner, "kv_pool", None)),
                              "pool_gib": getattr(getattr(runner, "kv_pool", None), "nbytes", 0) / GIB}
    print(json.dumps(result), flush=True)
    try:
        outs = llm.generate([{"prompt_token_ids": [7] * 300}, {"prompt_token_ids": [9] * 40}],
                            SamplingParams(max_tokens=4, ignore_eos=True))
        result["outputs"] = [o.outputs[0].finish_reason for o in outs]
    except Exception:  # noqa: BLE001
        result["error"] = traceback.format_exc()[-1500:]
    result["programs"] = SEEN
    result["stats"] = {k: v for k, v in llm.llm_engine.stats().items() if k in ("recoveries",)}
    result["memory_stats"] = {k: v / GIB for k, v in (jax.devices()[0].memory_stats() or {}).items()
                              if k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit", "largest_alloc_size")}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "first_step.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "programs"}, default=str), flush=True)
    llm.shutdown()


if __name__ == "__main__":
    main()
