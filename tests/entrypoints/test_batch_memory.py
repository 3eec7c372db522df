"""The batch command's host memory guard and bounded memory on a big input (mock engine, scripted MemAvailable)."""

import json
import random
import tracemalloc

import pytest

from nexus_jax.entrypoints import batch
from nexus_jax.entrypoints.batch import HostMemoryError, available_memory_mb, run_batch
from nexus_jax.testing.engines import VOCAB, batch_engine, expected
from nexus_jax.testing.jsonl import read_jsonl


def write_input(path, n, max_tokens=4):
    lines = [{"id": f"r{i}", "prompt_token_ids": [random.randrange(VOCAB) for _ in range(random.randint(1, 6))],
              "max_tokens": random.randint(1, max_tokens)} for i in range(n)]
    with open(path, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return {line["id"]: line for line in lines}


def spy_admissions(engine):
    """Records the number of requests in the engine after each admission."""
    sizes = []
    original = engine.add_prepared

    def spy(group):
        original(group)
        sizes.append(len(engine.groups))
    engine.add_prepared = spy
    return sizes


class ScriptedMemory:
    """MemAvailable that is low on the checks whose index is in `low` (or on every check from `low_from` on)."""

    def __init__(self, low=(), low_from=None):
        self.low, self.low_from, self.calls, self.low_now = set(low), low_from, 0, False

    def __call__(self):
        self.low_now = self.calls in self.low or (self.low_from is not None and self.calls >= self.low_from)
        self.calls += 1
        return 10.0 if self.low_now else 10_000.0


def test_available_memory_reads_meminfo(tmp_path):
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:       24684000 kB\nMemFree:  100 kB\nMemAvailable:    2097152 kB\n")
    assert available_memory_mb(str(fake)) == 2048.0
    fake.write_text("MemTotal:       24684000 kB\n")
    assert available_memory_mb(str(fake)) is None
    assert available_memory_mb(str(tmp_path / "absent")) is None
    real = available_memory_mb()
    assert real is None or real > 0


def test_floor_above_available_memory_refuses_before_admitting(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 20)
    engine = batch_engine()
    admitted = spy_admissions(engine)
    with pytest.raises(HostMemoryError, match="below the batch's floor") as e:
        run_batch(engine, str(inp), str(out), min_available_mb=1e12, memory_wait_s=0.0, progress=False)
    assert isinstance(e.value, MemoryError)
    assert "min_available_mb" in str(e.value) and str(out) in str(e.value)
    assert not admitted and out.read_text() == ""
    for bad in ({"min_available_mb": -1.0}, {"memory_wait_s": -0.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            run_batch(engine, str(inp), str(out), progress=False, **bad)


def test_low_memory_holds_admissions_back_and_the_batch_still_finishes(tmp_path, monkeypatch):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = write_input(inp, 300, max_tokens=6)
    memory = ScriptedMemory(low=random.sample(range(200), 60))
    monkeypatch.setattr(batch, "available_memory_mb", memory)
    engine = batch_engine()
    original = engine.add_prepared

    def admit(group):  # nothing is admitted on a step whose check found memory under the floor
        assert not memory.low_now, "a request was admitted while memory was under the floor"
        original(group)
    engine.add_prepared = admit
    cap = random.randint(2, 8)
    summary = run_batch(engine, str(inp), str(out), max_in_flight=cap, min_available_mb=100.0, progress=False)
    assert summary.completed == 300 and summary.errors == 0
    assert 0 < summary.memory_holds <= 60
    for r in read_jsonl(out):
        line = lines[r["id"]]
        assert r["token_ids"] == expected(line["prompt_token_ids"], line["max_tokens"])
    assert engine.block_manager.usage == 0.0 and not engine.groups


def test_memory_that_never_comes_back_drains_then_stops_and_a_rerun_resumes(tmp_path, monkeypatch):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 200, max_tokens=8)
    monkeypatch.setattr(batch, "available_memory_mb", ScriptedMemory(low_from=random.randint(3, 10)))
    engine = batch_engine()
    admitted = spy_admissions(engine)
    cap = random.randint(4, 12)
    with pytest.raises(HostMemoryError, match="rerun with the same output to resume"):
        run_batch(engine, str(inp), str(out), max_in_flight=cap, min_available_mb=100.0, memory_wait_s=0.05,
                  progress=False)
    written = read_jsonl(out)
    assert 0 < len(written) == len(admitted) < 200  # every admitted request finished and was written first
    assert max(admitted) <= cap and not engine.groups and engine.block_manager.usage == 0.0

    monkeypatch.setattr(batch, "available_memory_mb", ScriptedMemory())
    again = run_batch(batch_engine(), str(inp), str(out), max_in_flight=cap, min_available_mb=100.0, progress=False)
    assert (again.skipped, again.completed) == (len(written), 200 - len(written))
    assert sorted(r["id"] for r in read_jsonl(out)) == sorted(f"r{i}" for i in range(200))


def test_big_input_runs_in_a_bounded_window_with_results_written_as_they_finish(tmp_path):
    n = 4000
    inp, out = tmp_path / "big.jsonl", tmp_path / "out.jsonl"
    write_input(inp, n, max_tokens=2)
    engine = batch_engine()
    admitted = spy_admissions(engine)
    finished = []
    original = engine.step

    def step():  # before each step, every request finished so far is already in the output file
        with open(out) as f:
            assert sum(1 for _ in f) == len(finished)
        outs = original()
        finished.extend(o for o in outs if o.finished)
        return outs
    engine.step = step
    cap = random.randint(8, 64)
    summary = run_batch(engine, str(inp), str(out), max_in_flight=cap, progress=False)
    assert summary.completed == n and len(read_jsonl(out)) == n
    assert max(admitted) == cap  # the window fills up and never goes past the cap

    tracemalloc.start()  # the line index costs a few bytes a line (a list of tuples would take about 128)
    source = batch._JsonlSource(str(inp))
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(source) == n and size < 24 * n
