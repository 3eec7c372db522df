"""The batch command: good and bad lines, bounded in-flight requests, resume; the CLI once on the default model."""

import argparse
import json
import random

import pytest

from nexus_jax.cli.service import register
from nexus_jax.entrypoints.batch import run_batch
from nexus_jax.testing.engines import VOCAB, batch_engine, expected
from nexus_jax.testing.jsonl import read_jsonl


def write_lines(path, lines, mode="w"):
    with open(path, mode) as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


GOOD_IDS = [[random.randrange(VOCAB) for _ in range(random.randint(1, 9))] for _ in range(6)]
GOOD = [{"id": f"g{i}", "prompt_token_ids": ids, "max_tokens": 3 + i} for i, ids in enumerate(GOOD_IDS)]
GOOD[1].update(program_id="agent", thread_id="t1")  # calls of agentic programs
GOOD[2].update(program_id="agent")
BAD = [("{not json", None, "malformed JSON"),
       ({"prompt": "no id"}, None, "id must be"),
       ({"id": "b1", "prompt_token_ids": [1], "top_p": 5}, "b1", "top_p"),
       ({"id": "b2", "prompt_token_ids": [1], "bogus": 1}, "b2", "bogus"),
       ({"id": "b3", "prompt": "x", "prompt_token_ids": [1]}, "b3", "exactly one"),
       ({"id": "b4", "prompt_token_ids": [VOCAB + 1]}, "b4", "vocabulary"),
       ({"id": "g0", "prompt_token_ids": [1]}, "g0", "duplicate"),
       ({"id": "b5", "prompt_token_ids": [1], "program_id": ""}, "b5", "program_id"),
       ({"id": "b6", "prompt_token_ids": [1], "program_id": "p", "thread_id": 3}, "b6", "thread_id"),
       ([1, 2], None, "JSON object")]


def test_good_and_bad_lines_then_resume(tmp_path, tokenizer):
    inp, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    text_line = {"id": 42, "prompt": "hello batch", "max_tokens": 4, "temperature": 0.0}
    lines = GOOD[:3] + [b[0] for b in BAD] + ["", text_line] + GOOD[3:]
    write_lines(inp, lines)
    engine = batch_engine(tokenizer)
    peak = []
    original = engine.add_prepared

    programs = []

    def spy(group):  # the window of requests in the engine stays bounded
        original(group)
        peak.append(len(engine.groups))
        programs.append((group.seqs[0].program_id, group.seqs[0].thread_id))
    engine.add_prepared = spy
    summary = run_batch(engine, str(inp), str(out), str(err), defaults={"temperature": 0.0}, max_in_flight=2,
                        progress=False)
    assert max(peak) <= 2
    assert programs[1:3] == [("agent", "t1"), ("agent", "")] and programs[0] == (None, "")
    assert (summary.completed, summary.errors, summary.skipped, summary.lines) == (7, len(BAD), 0, 7 + len(BAD))
    results = {r["id"]: r for r in read_jsonl(out)}
    for i, ids in enumerate(GOOD_IDS):
        r = results[f"g{i}"]
        assert r["token_ids"] == expected(ids, 3 + i) and r["finish_reason"] == "length"
        assert r["prompt_tokens"] == len(ids) and 0 < r["ttft_s"] <= r["e2e_s"]
    prompt = tokenizer.encode("hello batch")
    assert results[42]["token_ids"] == expected(prompt, 4)
    assert results[42]["text"] == tokenizer.decode(expected(prompt, 4))
    errors = read_jsonl(err)
    assert len(errors) == len(BAD)
    for k, (record, (_, rid, reason)) in enumerate(zip(errors, BAD)):
        assert record["id"] == rid and reason in record["error"], record
        assert record["line"] == 4 + k  # after the three good lines
    assert engine.block_manager.usage == 0.0 and not engine.groups

    # Resume: a torn last line from an interrupted run is dropped, done ids are skipped, new lines run.
    with open(out, "a") as f:
        f.write('{"id": "g9", "text": "tor')
    write_lines(inp, [{"id": "new", "prompt_token_ids": [3], "max_tokens": 2}], mode="a")
    again = run_batch(batch_engine(tokenizer), str(inp), str(out), str(err), max_in_flight=4, progress=False)
    assert (again.completed, again.skipped, again.errors) == (1, 7, len(BAD))  # the duplicate g0 is an error again
    assert again.completed + again.skipped + again.errors == again.lines == summary.lines + 1
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(map(str, ids)) == sorted(map(str, list(results) + ["new"]))
    assert read_jsonl(out)[-1]["token_ids"] == [4, 5]


def test_missing_input_raises(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nope"):
        run_batch(batch_engine(tokenizer), str(tmp_path / "nope.jsonl"), str(tmp_path / "o.jsonl"))


def test_cli_on_the_default_model(tmp_path, capsys, monkeypatch):
    inp, out = tmp_path / "p.jsonl", tmp_path / "r.jsonl"
    write_lines(inp, [{"id": "a", "prompt": "The capital of France is", "temperature": 0.0},
                      {"id": "b", "prompt_token_ids": [5, 6, 7], "max_tokens": 3, "ignore_eos": True},
                      {"id": "c", "prompt": "x", "max_tokens": -1}])
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["batch", "--input", str(inp), "--output", str(out), "--dtype", "float32",
                              "--max-tokens", "5"])
    assert args.func(args) == 0
    results = {r["id"]: r for r in read_jsonl(out)}
    assert set(results) == {"a", "b"}
    assert 1 <= len(results["a"]["token_ids"]) <= 5 and len(results["b"]["token_ids"]) == 3
    errors = read_jsonl(tmp_path / "r.errors.jsonl")
    assert [(e["id"], e["line"]) for e in errors] == [("c", 3)] and "max_tokens" in errors[0]["error"]
    err = capsys.readouterr().err
    assert "2 completed" in err and "1 errors" in err and "3/3 requests" in err and "tok/s" in err

    # A host memory floor above what the machine has: the command refuses with a message, not a traceback. The
    # command has no flag for run_batch's memory_wait_s, whose default would idle here 30 s before refusing; 1 s
    # still polls the floor (every 0.5 s) before giving up.
    monkeypatch.setitem(run_batch.__kwdefaults__, "memory_wait_s", 1.0)
    args = parser.parse_args(["batch", "--input", str(inp), "--output", str(tmp_path / "r2.jsonl"),
                              "--dtype", "float32", "--min-available-mb", "1e12"])
    assert args.func(args) == 1
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "r2.jsonl").exists() or read_jsonl(tmp_path / "r2.jsonl") == []


def test_logprobs_a_line_asks_for_are_written(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [{"id": "lp", "prompt_token_ids": [5, 6], "max_tokens": 2, "logprobs": 1,
                       "prompt_logprobs": 0}, {"id": "plain", "prompt_token_ids": [5], "max_tokens": 2}])
    run_batch(batch_engine(), str(inp), str(out), None, progress=False, min_available_mb=None)
    records = {r["id"]: r for r in read_jsonl(out)}
    assert [sorted(p) for p in records["lp"]["logprobs"]] == [["7"], ["8"]]
    assert records["lp"]["prompt_logprobs"][0] is None  # the mock computes no prompt log-probs beyond
    assert "logprobs" not in records["plain"] and "prompt_logprobs" not in records["plain"]
