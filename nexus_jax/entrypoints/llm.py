"""`LLM`: the offline, vLLM-compatible entry point (`from nexus_jax import LLM, SamplingParams`)."""

from __future__ import annotations

import itertools
import sys
import time
from typing import Any, Sequence

from nexus_jax.core.config import EngineConfig
from nexus_jax.core.engine import LLMEngine
from nexus_jax.core.outputs import RequestOutput
from nexus_jax.core.sampling_params import SamplingParams
from nexus_jax.core.tokenizer import Tokenizer
from nexus_jax.entrypoints.build import build_engine

PromptType = str | dict[str, Any]


class LLM:
    """LLM(model=None) serves the embedded tiny default model; give a checkpoint directory for a real one.

    Keyword arguments are EngineConfig's fields (dtype, max_model_len, block_size, gpu_memory_utilization,
    max_num_seqs, max_num_batched_tokens, enable_prefix_caching, scheduling_policy, seed, ...).
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        self.llm_engine = build_engine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        """Wraps an existing engine (e.g. one over the mock executor in tests)."""
        llm = cls.__new__(cls)
        llm.llm_engine = engine
        llm._ids = itertools.count()
        return llm

    def shutdown(self) -> None:
        """Stops what the engine started (the disaggregated mode's worker processes and MPS daemon)."""
        self.llm_engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def get_tokenizer(self) -> Tokenizer | None:
        return self.llm_engine.tokenizer

    def session(self, program_id: str):
        """`with llm.session("agent-1"):` keeps the program's record (attained service) across its calls, which
        the program-aware policies (scheduling_policy "plas", "atlas", "mlfq") rank by."""
        return self.llm_engine.session(program_id)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 program_id: str | None = None) -> list[RequestOutput]:
        """Generates for every prompt and returns the outputs in input order.

        Bad input (an empty or over-long prompt, a token id outside the vocabulary, a mismatched list of
        sampling params) raises ValueError before anything is queued, and the engine keeps serving.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, Sequence):
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        else:
            params = [sampling_params] * len(prompts)
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"{len(priority)} priorities for {len(prompts)} prompts")
        engine = self.llm_engine
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        added: list[str] = []
        try:
            for i, (rid, prompt, p) in enumerate(zip(ids, prompts, params)):
                try:
                    engine.add_request(rid, prompt, p, priority=0 if priority is None else priority[i],
                                       program_id=program_id, thread_id=str(i))
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}") from None
                added.append(rid)
        except BaseException:
            for rid in added:  # all or nothing: withdraw what this call queued
                engine.abort_request(rid)
            engine.step()
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, chat_template_kwargs: dict[str, Any] | None = None,
             program_id: str | None = None) -> list[RequestOutput]:
        """Generates replies to one conversation (a list of {"role", "content"} messages) or to a list of them,
        rendered with the model's chat template (as vLLM's LLM.chat); outputs in input order. ValueError when the
        model has no tokenizer or chat template; jinja2.TemplateError when the template refuses the messages (as
        transformers raises)."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("the model has no tokenizer, so no chat template: use generate() with token ids")
        messages = list(messages)
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[PromptType] = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                 **(chat_template_kwargs or {}))
            # The template places the special tokens (BOS included): encoding must add none.
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, program_id=program_id)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        wanted = set(ids)
        done: dict[str, RequestOutput] = {}
        progress = _Progress(len(ids)) if use_tqdm else None
        while len(done) < len(ids):
            for out in self.llm_engine.step():
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
                    if progress:
                        progress.update(out)
        self.llm_engine.settle()
        if progress:
            progress.close()
        return [done[i] for i in ids]


class _Progress:
    """A one-line progress bar on stderr: requests done and output tokens/s (tqdm-like, no dependency)."""

    def __init__(self, total: int):
        self.total, self.done, self.tokens, self.start = total, 0, 0, time.monotonic()

    def update(self, out: RequestOutput) -> None:
        self.done += 1
        self.tokens += sum(len(c.token_ids) for c in out.outputs)
        rate = self.tokens / max(time.monotonic() - self.start, 1e-9)
        print(f"\rProcessed prompts: {self.done}/{self.total}, {rate:.1f} output tok/s", end="", file=sys.stderr)

    def close(self) -> None:
        print(file=sys.stderr)
