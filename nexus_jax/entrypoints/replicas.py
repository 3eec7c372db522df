"""`ReplicatedAsyncLLM`: N engine replicas behind one front end with `AsyncLLM`'s surface, calls routed by program.

    llm = ReplicatedAsyncLLM.from_config(EngineConfig(model=...), num_replicas=4, routing="locality")
    async for out in llm.generate(prompt, params, program_id="agent-7"):
        ...
    llm.end_program("agent-7")   # or `with llm.session("agent-7"):` around the program's calls
    llm.shutdown()

Each call is routed on arrival by `nexus_jax.programs.router.Router` from its program id and prompt length (text prompts
are tokenized here once and handed on as token ids with their text). The front end remembers which replica has
each request until its stream ends, so `abort` reaches it, and counts the tokens each stream yields as that
replica's load. A replica whose engine thread died is never chosen again: its open streams end with
`EngineDeadError` (AsyncLLM delivers it to each of them), and its programs move to other replicas. Requests are
never moved between replicas: one that was running on a dead replica fails, and the caller decides whether to
send it again.

Replicas are any `AsyncLLM`s in this process. `from_config(config, n, devices=[0, 1, ...])` places replica i on
`jax.devices()[devices[i]]` (`EngineConfig.device`: its weights and KV pool are committed there, its pool sized
from that device's memory, its steps run there): one engine per GPU of a host. Without `devices` every replica
goes where `config` says: several engines on one device (CPU tests, or several small engines sharing one GPU
with `num_kv_blocks` set per engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import threading
from typing import Any, AsyncIterator, Iterator, Sequence

from nexus_jax.core.config import EngineConfig
from nexus_jax.core.engine import LLMEngine
from nexus_jax.core.outputs import RequestOutput
from nexus_jax.core.sampling_params import SamplingParams
from nexus_jax.entrypoints.async_llm import AsyncLLM, EngineDeadError
from nexus_jax.programs.router import Router, RouterConfig


class ReplicatedAsyncLLM:
    def __init__(self, replicas: Sequence[AsyncLLM], routing: str | RouterConfig = "locality"):
        if not replicas:
            raise ValueError("ReplicatedAsyncLLM needs at least one replica")
        self.replicas = list(replicas)
        self.router = Router(len(self.replicas), routing if isinstance(routing, RouterConfig)
                             else RouterConfig(routing))
        self._lock = threading.Lock()  # guards the router: abort and shutdown may come from other threads
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig, num_replicas: int = 2, routing: str | RouterConfig = "locality",
                    devices: Sequence[int] | None = None) -> "ReplicatedAsyncLLM":
        """`num_replicas` engines of one configuration in this process. devices=None: each as `config` places it;
        otherwise replica i runs on `jax.devices()[devices[i]]` (one index per replica; an index may repeat)."""
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if devices is None:
            return cls.from_configs([config] * num_replicas, routing)
        devices = list(devices)
        if len(devices) != num_replicas:
            raise ValueError(f"devices names {len(devices)} device(s) for {num_replicas} replicas: give one each")
        return cls.from_configs([dataclasses.replace(config, device=d) for d in devices], routing)

    @classmethod
    def from_configs(cls, configs: Sequence[EngineConfig],
                     routing: str | RouterConfig = "locality") -> "ReplicatedAsyncLLM":
        """One engine per configuration (all of one model); those started are stopped if one fails to start."""
        replicas: list[AsyncLLM] = []
        try:
            for config in configs:
                replicas.append(AsyncLLM.from_config(config))
        except BaseException:
            for replica in replicas:
                replica.shutdown()
            raise
        return cls(replicas, routing)

    @property
    def engine(self) -> LLMEngine:
        """The first replica's engine: model facts (tokenizer, context length, vocabulary) shared by all."""
        return self.replicas[0].engine

    async def generate(self, prompt: str | dict[str, Any], sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, *, priority: int = 0, delta: bool = True,
                       program_id: str | None = None, thread_id: str = "") -> AsyncIterator[RequestOutput]:
        """AsyncLLM.generate on the replica the router chooses; same arguments, same outputs."""
        request_id = request_id if request_id is not None else f"replicated-{next(self._ids)}"
        if isinstance(prompt, str) or isinstance(prompt, dict) and "prompt_token_ids" not in prompt:
            prompt, length = await asyncio.to_thread(self._tokenized, prompt)  # encoding would stall the loop
        else:
            prompt, length = self._tokenized(prompt)
        with self._lock:
            if request_id in self.router.calls:
                raise ValueError(f"request_id {request_id!r} is already in use")
            for i, replica in enumerate(self.replicas):
                if replica.dead_error is not None and i not in self.router.dead:
                    self.router.mark_dead(i)
            if len(self.router.dead) == len(self.replicas):
                raise EngineDeadError("every replica has stopped")
            index = self.router.route(request_id, program_id, length)
        replica = self.replicas[index]
        stream = replica.generate(prompt, sampling_params, request_id, priority=priority, delta=delta,
                                  program_id=program_id, thread_id=thread_id)
        generated = 0
        try:
            async for out in stream:
                tokens = sum(len(c.token_ids) for c in out.outputs)
                generated = generated + tokens if delta else tokens
                with self._lock:
                    self.router.progress(request_id, generated)
                yield out
        except EngineDeadError:
            with self._lock:
                self.router.mark_dead(index)
            raise
        finally:
            with self._lock:
                self.router.finish(request_id)
            await stream.aclose()  # a stream left early aborts its request on the replica

    def abort(self, request_id: str) -> None:
        """Aborts a request on the replica it went to; nothing for an unknown or finished request."""
        with self._lock:
            index = self.router.replica_of(request_id)
        if index is not None:
            self.replicas[index].abort(request_id)

    def end_program(self, program_id: str) -> None:
        """The program made its last call: the router forgets its replica (once its calls in flight end)."""
        with self._lock:
            self.router.end_program(program_id)

    @contextlib.contextmanager
    def session(self, program_id: str) -> Iterator[str]:
        try:
            yield program_id
        finally:
            self.end_program(program_id)

    def set_routing(self, routing: str | RouterConfig) -> None:
        """A new router (benchmarks compare routing policies on the same engines); only with no call in flight.
        Programs' replicas are forgotten; dead replicas stay dead."""
        config = routing if isinstance(routing, RouterConfig) else RouterConfig(routing)
        with self._lock:
            if self.router.calls:
                raise RuntimeError(f"cannot change the routing with {len(self.router.calls)} calls in flight")
            router = Router(len(self.replicas), config)
            for i in self.router.dead:
                router.mark_dead(i)
            self.router = router

    def stats(self) -> list[dict[str, Any]]:
        """Per replica: the router's view (tokens and calls in flight, dead) and the engine's levels."""
        with self._lock:
            view = [{"load_tokens": self.router.load[i], "in_flight": self.router.in_flight[i],
                     "dead": i in self.router.dead} for i in range(len(self.replicas))]
        return [{**v, **r.engine.stats()} for v, r in zip(view, self.replicas)]

    def shutdown(self) -> None:
        """Stops every replica; unfinished streams end with EngineDeadError."""
        errors = []
        for replica in self.replicas:
            try:
                replica.shutdown()
            except Exception as e:  # stop the others anyway
                errors.append(e)
        if errors:
            raise errors[0]

    def _tokenized(self, prompt: str | dict[str, Any]) -> tuple[str | dict[str, Any], int]:
        """The prompt with its token ids (so replicas do not tokenize again) and its length for routing. A
        prompt this cannot read goes on unchanged, with length 1, for the replica to reject with its reason."""
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        if isinstance(ids, (list, tuple)):
            return prompt, max(len(ids), 1)
        tokenizer = self.engine.tokenizer
        odd = isinstance(prompt, dict) and set(prompt) - {"prompt"}
        if not isinstance(text, str) or not text or tokenizer is None or odd:
            return prompt, 1
        tokenizer.check_text_length(text, self.engine.max_model_len, "max_model_len")
        ids = tokenizer.encode(text)
        return ({"prompt": text, "prompt_token_ids": ids} if ids else prompt), max(len(ids), 1)
