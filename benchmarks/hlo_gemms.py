"""The GEMMs of XLA's optimized programs, one line each: module, instruction, shape, and how it runs (the Triton tiling
or the cuBLAS call). Used by `gpu_calls.sh hlo` to compare the split's workers with the aggregated engine.

  python3 benchmarks/hlo_gemms.py DUMP_DIR   # a directory written with --xla_dump_to ... --xla_dump_hlo_as_text
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_INSTR = re.compile(r"^\s*(ROOT )?%?(?P<name>[\w.-]+) = (?P<shape>\S+) (?P<op>fusion|custom-call)\(")
_CONFIG = re.compile(r'"(triton_gemm_config|block_level_fusion_config)":(\{[^}]*\})|custom_call_target="([^"]+)"')


def gemm_lines(dump: Path) -> list[str]:
    rows = set()
    for path in sorted(dump.glob("*after_optimizations.txt")):
        module = path.name.split(".")[1] if path.name.count(".") > 2 else path.name
        for line in path.read_text(errors="replace").splitlines():
            m = _INSTR.match(line)
            if not m or ("gemm" not in m["name"] and "cublas" not in line):
                continue
            how = " ".join(c[0] + c[1] if c[0] else c[2] for c in _CONFIG.findall(line)) or line[-200:]
            rows.add(f"{module}\t{m['name']}\t{m['shape']}\t{how}")
    return sorted(rows)


if __name__ == "__main__":
    print("\n".join(gemm_lines(Path(sys.argv[1]))))
