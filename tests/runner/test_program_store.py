"""The program store: a runner built after another one (as a restarted engine is) runs the forward programs the
first stored, without tracing the model, with the same outputs; a damaged entry is compiled again; keys follow the
code and the shapes."""

import os

import numpy as np
import pytest

from runner import program_store
from runner.executor import StepInput
from runner.model.checkpoint import random_params
from runner.model.config import ModelConfig
from runner.model.llama import Transformer
from runner.model_runner import ModelRunner
from runner.program_store import ProgramStore
from runner.sampling import SamplingRow
from runner.step_batch import SeqChunk

CONFIG = ModelConfig.preset("tiny")
PARAMS = random_params(CONFIG, seed=3)


@pytest.fixture
def traces(monkeypatch):
    """How many times the model is traced (its __call__ runs only while a program is traced)."""
    count = [0]
    call = Transformer.__call__

    def counting(self, *args, **kwargs):
        count[0] += 1
        return call(self, *args, **kwargs)
    monkeypatch.setattr(Transformer, "__call__", counting)
    return count


def runner(store):
    return ModelRunner(CONFIG, PARAMS, num_blocks=16, block_size=16, program_store=store)


def step(r):
    """Logits of a 12-token prefill, then of its first decode (a second program shape)."""
    prompt = list(range(5, 17))
    first = r.logits([], [SeqChunk(prompt, 0, [0])])
    token = int(np.argmax(first[0]))
    return first, r.logits([SeqChunk([token], len(prompt), [0])], [])


def test_a_later_runner_loads_the_stored_programs_without_tracing_the_model(tmp_path, traces):
    store = ProgramStore(tmp_path)
    plain = step(ModelRunner(CONFIG, PARAMS, num_blocks=16, block_size=16))
    first = step(runner(store))
    assert len(list(tmp_path.glob("forward-*.xla"))) == 2  # the prefill shape and the decode shape
    traced = traces[0]
    again = step(runner(store))
    assert traces[0] == traced, "the second runner traced the model: it did not use the stored programs"
    for a, b, c in zip(plain, first, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(b, c)


def sampled(r):
    """Tokens sampled by a prefill step of two prompts (greedy and seeded at temperature 1), then by their decode."""
    rows = [SamplingRow.validated(temperature=0.0), SamplingRow.validated(temperature=1.0, seed=7)]
    prefill = r.dispatch(StepInput([], [SeqChunk(list(range(5, 17)), 0, [0]), SeqChunk([3, 4, 5], 0, [1])],
                                   rows)).result()
    decode = r.dispatch(StepInput([SeqChunk([int(prefill[0])], 12, [0]), SeqChunk([int(prefill[1])], 3, [1])], [],
                                  [row.at_step(1) for row in rows])).result()
    return np.asarray(prefill), np.asarray(decode)


def test_a_later_runner_loads_the_stored_samplers(tmp_path, monkeypatch):
    store = ProgramStore(tmp_path)
    plain = sampled(ModelRunner(CONFIG, PARAMS, num_blocks=16, block_size=16))
    first = sampled(runner(store))
    assert any(tmp_path.glob("sample_step-*.xla"))
    writes = []
    monkeypatch.setattr(ProgramStore, "_write", lambda self, path, data: writes.append(path.name))
    again = sampled(runner(store))
    assert writes == [], f"the second runner compiled {writes} instead of loading them"
    for a, b, c in zip(plain, first, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(b, c)


def test_a_damaged_entry_is_compiled_again_and_replaced(tmp_path, traces, caplog):
    store = ProgramStore(tmp_path)
    expected = step(runner(store))
    for path in tmp_path.glob("forward-*.xla"):
        path.write_bytes(b"not an executable")
    with caplog.at_level("WARNING", logger="runner.program_store"):
        got = step(runner(store))
    assert "did not load" in caplog.text and "compiling it again" in caplog.text
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)
    traced = traces[0]
    step(runner(store))  # the rewritten entries load
    assert traces[0] == traced


def test_warm_up_through_the_store_compiles_once_and_loads_after(tmp_path, traces):
    store = ProgramStore(tmp_path)
    made = program_store.programs_made
    n = runner(store).warmup(2, 16, 16, num_scheduler_steps=2)
    assert program_store.programs_made - made > 0
    assert any(tmp_path.glob("decode_steps-*.xla")) and any(tmp_path.glob("forward-*.xla"))
    traced = traces[0]
    assert runner(store).warmup(2, 16, 16, num_scheduler_steps=2) == n
    assert traces[0] == traced, "a warm-up after the first traced the model"


def test_keys_follow_the_code_and_the_shapes(tmp_path, monkeypatch):
    store = ProgramStore(tmp_path)
    here = store.path("forward", "model", "shapes")
    assert store.path("forward", "model", "other shapes") != here
    assert store.path("forward", "other model", "shapes") != here
    monkeypatch.setattr(program_store, "code_fingerprint", lambda: "changed code")
    assert store.path("forward", "model", "shapes") != here


def test_recent_lists_one_models_entries_most_recently_used_first(tmp_path):
    store = ProgramStore(tmp_path)
    paths = [store.path("forward", "model", f"shape {i}") for i in range(3)]
    for i, path in enumerate(paths):
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    store.path("forward", "other model", "shape 0").write_bytes(b"x")
    assert store.recent("model", 8) == paths[::-1]
    assert store.recent("model", 2) == paths[:0:-1]
    os.utime(paths[0], (2000, 2000))  # used last
    assert store.recent("model", 1) == paths[:1]


def test_a_write_past_the_bound_removes_the_least_recently_used_entries(tmp_path):
    big = ProgramStore(tmp_path)
    step(runner(big))  # two forward programs
    entries = sorted(tmp_path.glob("*.xla"), key=lambda p: p.stat().st_mtime)
    sizes = [p.stat().st_size for p in entries]
    os.utime(entries[0], (1000, 1000))  # the older one
    bounded = ProgramStore(tmp_path, max_bytes=sum(sizes) + 1)
    bounded._write(tmp_path / "forward-x-y.xla", b"z" * 2)  # one more entry pushes the store past its bound
    assert not entries[0].exists() and entries[1].exists() and (tmp_path / "forward-x-y.xla").exists()


def test_a_later_runner_starts_loading_its_recent_programs_before_its_first_step(tmp_path, monkeypatch):
    store = ProgramStore(tmp_path)
    expected = sampled(runner(store))
    stored = {path.name for path in tmp_path.glob("*.xla")}
    assert len(stored) >= 3  # the two forward shapes and at least one sampler
    later = runner(store)
    assert set(later.programs._loading) == stored, "the runner did not start loading its stored programs"
    loads = []
    monkeypatch.setattr(ProgramStore, "load", lambda self, path, device=None: loads.append(path.name))
    got = sampled(later)
    assert loads == [] and later.programs._loading == {}, "a step loaded a program again instead of the prefetch"
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_the_source_digest_follows_the_code_that_traces_the_programs(tmp_path):
    (tmp_path / "runner" / "model").mkdir(parents=True)
    (tmp_path / "pallas_kernels").mkdir()
    (tmp_path / "nexus_jax").mkdir()
    (tmp_path / "runner" / "model" / "llama.py").write_text("x = 1\n")
    (tmp_path / "pallas_kernels" / "k.py").write_text("y = 1\n")
    before = program_store.source_digest(tmp_path)
    (tmp_path / "nexus_jax" / "server.py").write_text("z = 1\n")  # serving code traces no program
    assert program_store.source_digest(tmp_path) == before
    for changed in ("runner/model/llama.py", "pallas_kernels/k.py"):
        (tmp_path / changed).write_text("x = 2\n")
        assert program_store.source_digest(tmp_path) != before
        before = program_store.source_digest(tmp_path)


RUN = """
import sys
from runner.compilation_cache import use_compilation_cache
use_compilation_cache(sys.argv[1])
from runner.model.checkpoint import random_params
from runner.model.config import ModelConfig
from runner.model_runner import ModelRunner
from runner.program_store import ProgramStore
from runner.sampling import SamplingRow
from runner.step_batch import SeqChunk
config = ModelConfig.preset("tiny")
store = ProgramStore(sys.argv[2]) if len(sys.argv) > 2 else None
r = ModelRunner(config, random_params(config, seed=3), num_blocks=16, block_size=16, program_store=store)
print(r.logits([], [SeqChunk(list(range(5, 17)), 0, [0])]).tobytes().hex())
"""


def test_a_program_first_stored_when_jax_cache_had_it_runs_in_a_later_process(tmp_path):
    """The order a deployment meets: JAX's cache warm from an older version, the store empty. XLA:CPU serializes
    an executable its cache loaded without its kernels ("Function ... not found" when a later process runs it)."""
    import subprocess
    import sys
    cache, store = str(tmp_path / "jax"), str(tmp_path / "store")
    outputs = []
    for args in ([cache], [cache, store], [cache, store]):  # fills JAX's cache; fills the store; loads it
        proc = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.append(proc.stdout.split()[-1])
    assert any((tmp_path / "store").glob("forward-*.xla"))
    assert outputs[0] == outputs[1] == outputs[2]


def test_engines_use_a_store_only_on_a_gpu(monkeypatch, tmp_path):
    """On XLA:CPU a large program's serialized executable lacks parts of its code (beside_compilation_cache)."""
    import types

    import jax
    assert program_store.beside_compilation_cache() is None  # no JAX cache in this process
    monkeypatch.setattr(program_store, "_jax_cache_dir", lambda: str(tmp_path))
    assert jax.devices()[0].platform == "cpu" and program_store.beside_compilation_cache() is None
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(platform="gpu")])
    store = program_store.beside_compilation_cache()
    assert store is not None and store.directory == tmp_path / "nexus-programs"


def test_only_cpu_compiles_turn_jax_cache_off(tmp_path, monkeypatch):
    """JAX reads its cache switch once per process: a GPU engine whose first compilation was a store compile under
    the switch ran with JAX's cache off for every other program."""
    import contextlib
    import types

    import jax
    switched = []
    monkeypatch.setattr(program_store, "_cache_switch", lambda on: switched.append(on) or contextlib.nullcontext())
    store, add = ProgramStore(tmp_path), jax.jit(lambda x: x + 1)
    store.executable("add", "m", "gpu", lambda: add.lower(np.ones(3)), device=types.SimpleNamespace(platform="gpu"))
    assert switched == []
    store.executable("add", "m", "cpu", lambda: add.lower(np.ones(3)), device=jax.devices()[0])
    assert switched == [False]
