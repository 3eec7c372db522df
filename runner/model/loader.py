"""Turns a user's `model` argument into a config, parameters and (when there is one) the tokenizer's directory.

`model` is a Hugging Face checkpoint directory, a preset name from `configs/` (random weights, for benchmarks),
or None for the embedded default model.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from runner.model.checkpoint import load_params, random_params
from runner.model.config import CONFIGS_DIR, ModelConfig, parse_dtype
from runner.model.default_model import default_model_dir

log = logging.getLogger(__name__)

@dataclasses.dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    params: dict[str, Any]
    tokenizer_dir: Path | None  # where tokenizer.json lies, if the model has one


def load_model(model: str | None = None, dtype: str = "auto", cache_dir: str | None = None,
               seed: int = 0, with_params: bool = True) -> LoadedModel:
    """with_params=False: config and tokenizer only (params None), for a process that leaves the weights to its
    workers (it never touches the device)."""
    jdtype = parse_dtype(dtype) if with_params else None
    if model is None:
        path = default_model_dir()
    else:
        path = Path(model).expanduser()
        if not path.is_dir():
            if (CONFIGS_DIR / f"{model}.json").is_file():
                config = ModelConfig.preset(model)
                log.warning("preset %s: random weights and no tokenizer (benchmarks only)", model)
                params = random_params(config, jdtype, seed=seed) if with_params else None
                return LoadedModel(model, config, params, None)
            known = sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
            raise FileNotFoundError(
                f"model {model!r} is neither a checkpoint directory nor a preset ({', '.join(known)})")
    config = ModelConfig.from_json(path)
    params = load_params(path, config, jdtype, cache_dir=cache_dir) if with_params else None
    return LoadedModel(str(path), config, params, path if (path / "tokenizer.json").is_file() else None)
