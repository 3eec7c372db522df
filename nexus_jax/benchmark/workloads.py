"""Agentic workloads: programs of dependent LLM calls, arriving as a Poisson process (docs/programs.md).

A program is a list of stages; a stage starts `delay` seconds (think time, tool latency) after every call of the
previous stage has finished, and its calls run in parallel (one thread each). Only lengths are generated, plus
how much of each prompt repeats the program's earlier context (what a prefix cache can serve): the simulator
needs nothing else, and a driver for the real engine fills prompts with random token ids.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nexus_jax.benchmark.datasets import WORKLOADS, LogNormal

MAX_CONTEXT = 8192  # prompts are cut to their newest tokens beyond this (Llama-3.1-8B serving default)


@dataclasses.dataclass(frozen=True)
class CallSpec:
    prompt_tokens: int
    output_tokens: int
    thread_id: str = ""
    # Leading prompt tokens that repeat the program's context as it stood after its previous stage (that
    # stage's prompt and the output the program kept). 0 for a first stage, and for a prompt cut to fit
    # MAX_CONTEXT: the cut drops the oldest tokens, so nothing of the old context is a prefix any more.
    prefix: int = 0


@dataclasses.dataclass(frozen=True)
class Stage:
    delay: float                  # seconds after the previous stage finished (or after the program's arrival)
    calls: tuple[CallSpec, ...]


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    program_id: str
    arrival: float
    stages: tuple[Stage, ...]

    @property
    def num_calls(self) -> int:
        return sum(len(s.calls) for s in self.stages)


# Chatbot: ShareGPT-like turns. A user turn is short (the ShareGPT prompt statistics include the history).
CHAT_CALLS_MEAN = 6.7
CHAT_USER = LogNormal.fit(70, 400)
CHAT_OUTPUT = WORKLOADS["sharegpt"].output          # mean 97, P99 474
CHAT_THINK_MEAN = 3.0                               # seconds a user takes before the next turn
# ReAct: a long instruction + few-shot prompt, short thoughts/actions, tool observations appended every step.
REACT_CALLS_MEAN = 10.8
REACT_SYSTEM = LogNormal.fit(1500, 3000)
REACT_OUTPUT = LogNormal.fit(60, 250)
REACT_OBSERVATION = LogNormal.fit(200, 1000)
REACT_TOOL_MEAN = 1.0                               # seconds of tool latency between steps
# Tree search: levels of parallel branches expanding the best path so far (beam / MCTS style).
TREE_DEPTH_MEAN = 3.0
TREE_WIDTH = (2, 8)                                 # branches per level, uniform inclusive
TREE_ROOT = LogNormal.fit(600, 2000)
TREE_OUTPUT = LogNormal.fit(120, 500)
TREE_EVAL_DELAY = 0.1                               # seconds to score the branches between levels


CALLS_SIGMA = 1.0  # spread of the log-normal number of calls (or levels) per program


def _num_calls(rng: np.random.Generator, mean: float) -> int:
    """Log-normal, rounded, at least 1: most programs are short and a few very long (Autellix's skew). A
    heavy tail matters: under a memoryless (geometric) count, attained service says nothing about what is left."""
    return int(LogNormal.fit(mean, sigma=CALLS_SIGMA).sample(rng, 1)[0])


def chatbot_program(rng: np.random.Generator, program_id: str, arrival: float) -> ProgramSpec:
    stages, history = [], 0
    for turn in range(_num_calls(rng, CHAT_CALLS_MEAN)):
        user = int(CHAT_USER.sample(rng, 1)[0])
        out = int(CHAT_OUTPUT.sample(rng, 1)[0])
        prompt = min(history + user, MAX_CONTEXT - out)
        delay = 0.0 if turn == 0 else float(rng.exponential(CHAT_THINK_MEAN))
        prefix = history if prompt == history + user else 0
        stages.append(Stage(delay, (CallSpec(prompt, out, prefix=prefix),)))
        history = prompt + out
    return ProgramSpec(program_id, arrival, tuple(stages))


def react_program(rng: np.random.Generator, program_id: str, arrival: float) -> ProgramSpec:
    stages, context, kept = [], int(REACT_SYSTEM.sample(rng, 1)[0]), 0
    for step in range(_num_calls(rng, REACT_CALLS_MEAN)):
        out = int(REACT_OUTPUT.sample(rng, 1)[0])
        prompt = min(context, MAX_CONTEXT - out)
        delay = 0.0 if step == 0 else float(rng.exponential(REACT_TOOL_MEAN))
        stages.append(Stage(delay, (CallSpec(prompt, out, prefix=kept if prompt == context else 0),)))
        kept = prompt + out  # the tool observation that follows is new to the next prompt
        context = kept + int(REACT_OBSERVATION.sample(rng, 1)[0])
    return ProgramSpec(program_id, arrival, tuple(stages))


def tree_search_program(rng: np.random.Generator, program_id: str, arrival: float) -> ProgramSpec:
    stages, path = [], int(TREE_ROOT.sample(rng, 1)[0])
    for level in range(_num_calls(rng, TREE_DEPTH_MEAN)):
        width = int(rng.integers(TREE_WIDTH[0], TREE_WIDTH[1] + 1))
        outs = TREE_OUTPUT.sample(rng, width)
        shared = 0 if level == 0 else path  # the previous level's path plus its chosen branch
        calls = tuple(CallSpec(min(path, MAX_CONTEXT - int(o)), int(o), f"t{b}",
                               shared if path <= MAX_CONTEXT - int(o) else 0) for b, o in enumerate(outs))
        stages.append(Stage(0.0 if level == 0 else TREE_EVAL_DELAY, calls))
        path = min(path + int(outs.max()), MAX_CONTEXT // 2)  # the chosen branch extends the path
    return ProgramSpec(program_id, arrival, tuple(stages))


GENERATORS = {"chatbot": chatbot_program, "react": react_program, "tree": tree_search_program}
MIXED = ("chatbot", "react", "tree")  # the mixed workload draws each program's kind uniformly


def generate(kind: str, num_programs: int, rate: float, seed: int = 0) -> list[ProgramSpec]:
    """`num_programs` programs of `kind` (a GENERATORS name or "mixed") with Poisson arrivals at `rate`/s."""
    if kind not in GENERATORS and kind != "mixed":
        raise ValueError(f"workload must be one of {', '.join(GENERATORS)}, mixed; got {kind!r}")
    if num_programs <= 0 or rate <= 0:
        raise ValueError(f"num_programs and rate must be positive, got {num_programs} and {rate}")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, num_programs))
    programs = []
    for i, t in enumerate(arrivals):
        name = MIXED[int(rng.integers(len(MIXED)))] if kind == "mixed" else kind
        programs.append(GENERATORS[name](rng, f"{name}-{i}", float(t)))
    return programs
