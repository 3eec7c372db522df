"""LLMEngines over the MockExecutor, and the outputs its rule gives, for tests that check tokens by hand."""

from __future__ import annotations

import copy
import threading
from typing import Any, Sequence

from nexus_jax.core.config import EngineConfig
from nexus_jax.core.engine import LLMEngine
from nexus_jax.core.tokenizer import Tokenizer
from nexus_jax.testing.mock_executor import MockExecutor

VOCAB = 512


def make_engine(num_blocks: int = 256, block_size: int = 4, tokenizer: Tokenizer | None = None,
                eos: Sequence[int] = (), max_model_len: int = 512, vocab_size: int = VOCAB,
                step_seconds: float | None = None, **config: Any) -> LLMEngine:
    """An engine over a fresh MockExecutor; `config` holds further EngineConfig fields."""
    executor = MockExecutor(vocab_size, num_blocks, block_size, step_seconds)
    return LLMEngine(EngineConfig(block_size=block_size, **config), executor, tokenizer,
                     max_model_len=max_model_len, vocab_size=vocab_size, eos_token_ids=eos)


def batch_engine(tokenizer: Tokenizer | None = None) -> LLMEngine:
    """The engine the batch command's tests run on: a 512-block pool, 256-token contexts."""
    return make_engine(num_blocks=512, tokenizer=tokenizer, max_model_len=256)


def expected(prompt: Sequence[int], n: int, vocab_size: int = VOCAB) -> list[int]:
    """The n tokens the mock's rule generates after `prompt` (greedy, nothing banned)."""
    return [(prompt[-1] + 1 + i) % vocab_size for i in range(n)]


def record_requests(engine: LLMEngine) -> list[tuple]:
    """Makes the engine record (prompt, program id, thread id) of every request it prepares; returns the list."""
    seen: list[tuple] = []
    prepare = engine.prepare_request

    def recording(*args, **kwargs):
        seen.append((args[1], kwargs.get("program_id"), kwargs.get("thread_id")))
        return prepare(*args, **kwargs)
    engine.prepare_request = recording
    return seen


def program_table(engine: LLMEngine) -> dict:
    """The programs of the engine's process table, by program id."""
    return engine.scheduler.programs.table.programs


def held_tokenizer(tokenizer: Tokenizer, hold_s: float = 5.0) -> tuple[Tokenizer, list[int], threading.Event]:
    """A copy of `tokenizer` whose encode records the length of each text, then waits (up to hold_s) for the
    returned event before encoding: a test can see where encoding runs and what it blocks meanwhile."""
    held = copy.copy(tokenizer)
    calls: list[int] = []
    release = threading.Event()

    def encode(text: str, add_special_tokens: bool = True) -> list[int]:
        calls.append(len(text))
        release.wait(hold_s)
        return tokenizer.encode(text, add_special_tokens)
    held.encode = encode
    return held, calls, release
