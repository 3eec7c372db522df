"""How much scratch memory each sampler program asks for, and which instructions hold it.

  PYTHONPATH=. python3 benchmarks/probe_sampler_memory.py [--out DIR] [--rows 16,64,80,272] [--vocab 128256]

At a full pool an engine ran out of memory in `jit_sample_step` asking for 34.46 GiB (RESULTS.md); on the CPU the
same program needs under 1 GiB. Each (rows, mode) program is compiled for this backend (not run) and its
`memory_analysis()` printed, with the largest instruction outputs of the biggest program's optimized HLO, which name
the op that holds the scratch.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="16,64,80,272")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    print("device:", jax.devices()[0].device_kind)
    table, worst = [], (0, None)
    for rows in (int(r) for r in args.rows.split(",")):
        for mode in MODES:
            logits = jax.ShapeDtypeStruct((rows, args.vocab), jnp.float32)
            st = SamplingTensors.from_rows([None] * rows).replace(mode=mode)
            fed = np.zeros(programs.FEED_ROWS, np.int32)
            compiled = programs.sample_step.lower(logits, st, 0, fed, np.full(rows, -1, np.int32)).compile()
            m = compiled.memory_analysis()
            temp = m.temp_size_in_bytes if m is not None else -1
            table.append({"rows": rows, "mode": mode, "temp_gib": temp / 2**30})
            print(f"rows {rows:4d} {mode:9s} temp {temp / 2**30:8.3f} GiB", flush=True)
            if temp > worst[0]:
                worst = (temp, compiled.as_text())
    result = {"device": jax.devices()[0].device_kind, "programs": table}
    if worst[1] is not None:
        result["largest_outputs"] = largest_outputs(worst[1])
        for gib, line in result["largest_outputs"]:
            print(f"{gib:8.3f} GiB  {line[:200]}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sampler_memory.json").write_text(json.dumps(result, indent=1))
        if worst[1] is not None:
            (args.out / "sampler_largest.hlo.txt").write_text(worst[1])


if __name__ == "__main__":
    main()
