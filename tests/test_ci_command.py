"""CI runs the README's test command as written, and that command takes torch's CPU build (no CUDA libraries)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readmes_test_command_which_installs_cpu_torch():
    readme = (ROOT / "README.md").read_text()
    (command,) = [line for block in re.findall(r"```bash\n(.*?)```", readme, re.S) for line in block.splitlines()
                  if "pytest" in line]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert command in ci, (command, ci)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in command
    assert re.search(r'"torch==[0-9.]+\+cpu"', command), command
