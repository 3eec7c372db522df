"""Reading the JSON-lines files the batch command writes, in tests."""

from __future__ import annotations

import json
from os import PathLike
from typing import Any


def read_jsonl(path: str | PathLike) -> list[Any]:
    with open(path) as f:
        return [json.loads(line) for line in f]
