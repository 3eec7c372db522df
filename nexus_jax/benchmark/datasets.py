"""Benchmark workloads: prompts (token ids from the vocabulary) and the output length each request is forced to.

Synthetic workloads draw lengths from log-normal distributions fitted to a published mean and P99 (see
docs/workloads.md for the fit and the numbers); content does not matter to a serving benchmark, only lengths do.
Output lengths are forced with ignore_eos + max_tokens, so every request produces exactly what it asks for.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

Z99 = 2.3263478740408408  # standard normal quantile at 0.99


@dataclasses.dataclass(frozen=True)
class LogNormal:
    """Lengths exp(N(mu, sigma^2)), rounded, at least 1."""

    mu: float
    sigma: float

    @classmethod
    def fit(cls, mean: float, p99: float | None = None, sigma: float = 0.5) -> "LogNormal":
        """The log-normal with this mean and P99: mean = exp(mu + s^2/2) and P99 = exp(mu + z s) give
        s^2/2 - z s + ln(P99/mean) = 0, whose smaller root is s. Without a P99, `sigma` is assumed."""
        if mean <= 0:
            raise ValueError(f"mean must be positive, got {mean}")
        if p99 is not None:
            gap = math.log(p99 / mean)
            if gap <= 0 or Z99 * Z99 < 2 * gap:
                raise ValueError(f"no log-normal has mean {mean} and P99 {p99}")
            sigma = Z99 - math.sqrt(Z99 * Z99 - 2 * gap)
        return cls(math.log(mean) - sigma * sigma / 2, sigma)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.maximum(np.rint(rng.lognormal(self.mu, self.sigma, n)), 1).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    input: LogNormal
    output: LogNormal


WORKLOADS = {
    "sharegpt": Workload("sharegpt", LogNormal.fit(496, 1367), LogNormal.fit(97, 474)),
    "long-doc": Workload("long-doc", LogNormal.fit(5905, 9817), LogNormal.fit(180)),
    "arxiv": Workload("arxiv", LogNormal.fit(3832, 6894), LogNormal.fit(200)),
}
MIXES = {"mix": (("sharegpt", 0.6), ("long-doc", 0.4)),
         "chat-long": (("sharegpt", 0.9), ("long-doc", 0.1))}  # chat with a few long prompts: a tight-TBT test
DATASETS = ("random", *WORKLOADS, *MIXES, "jsonl")


@dataclasses.dataclass
class BenchRequest:
    """One request: prompt is {"prompt": text} or {"prompt_token_ids": [...]}; prompt_len is None for text
    until the backend tokenizes it. Calls of an agentic program carry its id and their thread id."""

    prompt: dict[str, Any]
    prompt_len: int | None
    output_len: int
    source: str = ""
    program_id: str | None = None
    thread_id: str = ""


def sample_lengths(dataset: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Unclipped (input lengths, output lengths, workload name per request) of a synthetic dataset."""
    if dataset in WORKLOADS:
        w = WORKLOADS[dataset]
        return w.input.sample(rng, n), w.output.sample(rng, n), [dataset] * n
    if dataset not in MIXES:
        raise ValueError(f"unknown synthetic dataset {dataset!r}; known: {', '.join([*WORKLOADS, *MIXES])}")
    names, weights = zip(*MIXES[dataset])
    picks = rng.choice(len(names), size=n, p=np.asarray(weights) / sum(weights))
    ins, outs = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for k, name in enumerate(names):
        rows = picks == k
        ins[rows], outs[rows] = WORKLOADS[name].input.sample(rng, rows.sum()), WORKLOADS[name].output.sample(
            rng, rows.sum())
    return ins, outs, [names[k] for k in picks]


def clip_to_context(input_len: int, output_len: int, max_model_len: int) -> tuple[int, int]:
    """Output gets at most half the context and the input the rest, so both stay non-trivial on small models."""
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
    out = max(1, min(output_len, max_model_len // 2))
    return max(1, min(input_len, max_model_len - out)), out


def make_requests(dataset: str, num_requests: int, *, vocab_size: int, max_model_len: int, seed: int = 0,
                  input_len: int = 512, output_len: int = 128, path: str | None = None) -> list[BenchRequest]:
    """num_requests requests of a dataset (random, a synthetic workload, a mix, or jsonl from `path`)."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if dataset == "jsonl":
        if path is None:
            raise ValueError("the jsonl dataset needs a path (--dataset-path)")
        return load_jsonl(path, num_requests, vocab_size=vocab_size, default_output_len=output_len)
    rng = np.random.default_rng(seed)
    if dataset == "random":
        if input_len < 1 or output_len < 1:
            raise ValueError(f"input_len and output_len must be >= 1, got {input_len}, {output_len}")
        if input_len + output_len > max_model_len:
            raise ValueError(f"input_len {input_len} + output_len {output_len} exceeds the model's context "
                             f"of {max_model_len} tokens")
        ins, outs = np.full(num_requests, input_len), np.full(num_requests, output_len)
        names = ["random"] * num_requests
    else:
        ins, outs, names = sample_lengths(dataset, num_requests, rng)
    requests = []
    for i, o, name in zip(ins, outs, names):
        i, o = clip_to_context(int(i), int(o), max_model_len)
        ids = rng.integers(0, vocab_size, i).tolist()
        requests.append(BenchRequest({"prompt_token_ids": ids}, i, o, name))
    return requests


def salted(requests: list[BenchRequest], salt: int, vocab_size: int) -> list[BenchRequest]:
    """Copies whose token-id prompts start with a token shifted by `salt`: every block key chains from the first
    block, so a salted prompt shares no prefix-cache entry with the unsalted one (a sweep re-sending the same
    prompts would otherwise find them cached by the previous run). Text prompts are left as they are."""
    if salt == 0:
        return requests
    out = []
    for r in requests:
        ids = r.prompt.get("prompt_token_ids")
        if ids:
            r = dataclasses.replace(r, prompt={"prompt_token_ids": [(ids[0] + salt) % vocab_size, *ids[1:]]})
        out.append(r)
    return out


def load_jsonl(path: str, num_requests: int, *, vocab_size: int, default_output_len: int) -> list[BenchRequest]:
    """Lines {"prompt": str} or {"prompt_token_ids": [int]}, with an optional "output_len"; the file is cycled
    when it holds fewer lines than num_requests."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    rows = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e})") from None
        rows.append(_jsonl_request(row, f"{path}:{number}", vocab_size, default_output_len))
    if not rows:
        raise ValueError(f"{path} holds no requests")
    return [dataclasses.replace(rows[k % len(rows)]) for k in range(num_requests)]


def _jsonl_request(row: Any, where: str, vocab_size: int, default_output_len: int) -> BenchRequest:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a line must be a JSON object")
    output_len = row.get("output_len", default_output_len)
    if isinstance(output_len, bool) or not isinstance(output_len, int) or output_len < 1:
        raise ValueError(f"{where}: output_len must be a positive integer, got {output_len!r}")
    if "prompt_token_ids" in row:
        ids = row["prompt_token_ids"]
        if not isinstance(ids, list) or not ids or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
            raise ValueError(f"{where}: prompt_token_ids must be a non-empty list of ids in [0, {vocab_size})")
        return BenchRequest({"prompt_token_ids": ids}, len(ids), output_len, "jsonl")
    if not isinstance(row.get("prompt"), str) or not row["prompt"]:
        raise ValueError(f"{where}: needs a non-empty \"prompt\" string or \"prompt_token_ids\"")
    return BenchRequest({"prompt": row["prompt"]}, None, output_len, "jsonl")
