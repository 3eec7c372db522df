"""The batch output cannot be corrupted by a user's mistakes: one file given twice, a corrupt line in the output,
two runs on one output, repeated ids, and Ctrl-C (mock engine)."""

import argparse
import json
import os

import pytest

from nexus_jax.cli.service import register
from nexus_jax.entrypoints import batch, build
from nexus_jax.entrypoints.batch import BatchError, BatchInterrupted, OutputLockedError, run_batch
from nexus_jax.testing.engines import batch_engine, expected
from nexus_jax.testing.jsonl import read_jsonl


def write_input(path, n, extra=()):
    lines = [{"id": f"r{i}", "prompt_token_ids": [i % 50 + 1], "max_tokens": 2} for i in range(n)] + list(extra)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def run(inp, out, err=None, engine=None, **kwargs):
    return run_batch(engine or batch_engine(), str(inp), str(out), None if err is None else str(err),
                     progress=False, min_available_mb=None, **kwargs)


def test_one_file_given_twice_is_refused_before_anything_is_written(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 200)
    assert run(inp, out).completed == 200
    before, source = out.read_bytes(), inp.read_bytes()
    os.symlink(out, tmp_path / "link.jsonl")
    os.link(inp, tmp_path / "hard.jsonl")
    for err_path, out_path, what in ((out, out, "output and the errors file"),
                                     (tmp_path / "link.jsonl", out, "output and the errors file"),
                                     (tmp_path / "e.jsonl", inp, "input and the output"),
                                     (tmp_path / "hard.jsonl", out, "input and the errors file")):
        with pytest.raises(BatchError, match=f"the {what} are the same file"):
            run(inp, out_path, err_path)
    assert out.read_bytes() == before and inp.read_bytes() == source and not (tmp_path / "e.jsonl").exists()


def test_a_corrupt_line_in_the_middle_keeps_the_valid_results_after_it(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 200)
    run(inp, out)
    lines = out.read_text().splitlines(keepends=True)
    lost_id = json.loads(lines[48])["id"]
    lines[48] = '{"id": "r4", "text": "half a line\n'  # e.g. a crash mid-write, then more runs appended
    out.write_text("".join(lines))
    again = run(inp, out)
    assert again.corrupt_output_lines == [49]
    assert (again.skipped, again.completed, again.errors) == (199, 1, 0)  # only the corrupt line's id runs again
    results = out.read_text().splitlines()
    assert len(results) == 201 and results[48] == lines[48].rstrip("\n")  # kept in place, nothing after it lost
    ids = [json.loads(r)["id"] for i, r in enumerate(results) if i != 48]
    assert sorted(ids) == sorted(f"r{i}" for i in range(200)) and ids[-1] == lost_id


def test_a_second_run_on_the_same_output_fails_while_the_first_writes_it(tmp_path):
    inp, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    write_input(inp, 20, extra=[{"id": "bad", "prompt_token_ids": [1], "top_p": 5}])
    engine, second = batch_engine(), []
    step = engine.step

    def step_then_start_another_run():
        if not second:  # a second run starts while the first has requests in flight
            with pytest.raises(OutputLockedError, match="another batch run is writing") as e:
                run(inp, out, tmp_path / "other_err.jsonl")
            second.append(e.value)
        return step()
    engine.step = step_then_start_another_run
    summary = run(inp, out, err, engine=engine, max_in_flight=4)
    assert second and summary.completed == 20
    assert sorted(r["id"] for r in read_jsonl(out)) == sorted(f"r{i}" for i in range(20))  # each id once
    assert [e["id"] for e in read_jsonl(err)] == ["bad"] and not (tmp_path / "other_err.jsonl").exists()
    assert run(inp, out, err).skipped == 20  # the lock went with the first run


def test_repeated_ids_are_errors_on_every_run(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 5, extra=[{"id": "r1", "prompt_token_ids": [9]}, {"id": "r3", "prompt_token_ids": [9]}])
    first, again = run(inp, out), run(inp, out)
    assert (first.completed, first.skipped, first.errors) == (5, 0, 2)
    assert (again.completed, again.skipped, again.errors) == (0, 5, 2)
    errors = read_jsonl(out.with_suffix(".errors.jsonl"))
    assert [(e["line"], e["id"]) for e in errors] == [(6, "r1"), (7, "r3")] and "duplicate id" in errors[0]["error"]


def interrupting_engine(after_steps):
    engine, calls = batch_engine(), []
    step = engine.step

    def step_until_ctrl_c():
        calls.append(1)
        if len(calls) > after_steps:
            raise KeyboardInterrupt
        return step()
    engine.step = step_until_ctrl_c
    return engine


def test_ctrl_c_keeps_what_was_written_and_a_rerun_resumes(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 30)
    with pytest.raises(BatchInterrupted) as e:
        run(inp, out, engine=interrupting_engine(after_steps=4), max_in_flight=4)
    assert isinstance(e.value, KeyboardInterrupt)
    written = read_jsonl(out)
    assert 0 < e.value.summary.completed == len(written) < 30
    again = run(inp, out)
    assert (again.skipped, again.completed) == (len(written), 30 - len(written))
    results = read_jsonl(out)
    assert sorted(r["id"] for r in results) == sorted(f"r{i}" for i in range(30))
    assert all(r["token_ids"] == expected([int(r["id"][1:]) % 50 + 1], 2) for r in results)


def test_cli_exits_130_with_a_message_on_ctrl_c(tmp_path, monkeypatch, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 30)
    monkeypatch.setattr(build, "build_engine", lambda config: interrupting_engine(after_steps=4))
    monkeypatch.setattr(batch, "available_memory_mb", lambda: None)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["batch", "--input", str(inp), "--output", str(out), "--max-in-flight", "4",
                              "--no-progress"])
    assert args.func(args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "batch interrupted" in err and "rerun the same command to resume" in err
    assert f"{len(read_jsonl(out))} results written this run" in err and read_jsonl(out)

    monkeypatch.setattr(build, "build_engine", lambda config: batch_engine())
    out.write_text("not json\n" + out.read_text())
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "warning: line(s) 1 of" in err and "not valid results" in err and "batch done: " in err

    args = parser.parse_args(["batch", "--input", str(inp), "--output", str(out), "--errors", str(out)])
    assert args.func(args) == 1
    assert "error: the output and the errors file are the same file" in capsys.readouterr().err
