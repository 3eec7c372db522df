"""The gRPC load test at CI scale: a server in a child process over the embedded model, two waves of streams that
cancel, disconnect, abort, time out, send bad input and overload the admission limit; every stream must end in a
known way and the server must drain after each wave."""

import json
import random
import sys

import pytest

from nexus_jax.benchmark.load_test import ACTIONS, OUTCOMES, LoadSettings, check_loopback, plan_streams
from nexus_jax.cli.main import main

# Small step shapes (few compilations on CPU): 16 running requests, prompts and tables within 4 blocks.
ENGINE_ARGS = ("max_num_seqs=16", "min_table_blocks=4", "max_num_batched_tokens=32", "max_prefill_seqs=4")


def test_load_test_every_stream_ends_and_the_server_drains(tmp_path, capsys, monkeypatch):
    seed = random.randrange(1000)
    argv = ["bench", "load", "--streams", "160", "--waves", "2", "--warmup-waves", "0", "--max-in-flight", "96",
            "--retry-after-ms", "50",
            "--max-attempts", "2", "--max-tokens", "6", "--long-tokens", "48", "--prompt-len", "16",
            "--deadline-s", "0.2", "1.0", "--invalid", "0.06", "--stream-timeout-s", "90", "--drain-timeout-s", "20",
            "--seed", str(seed), "--out-dir", str(tmp_path), "--label", "ci"]
    for arg in ENGINE_ARGS:
        argv += ["--engine-arg", arg]
    monkeypatch.setattr(sys, "argv", ["nexus-jax", *argv])  # the results record the command line
    code = main(argv)
    doc = json.loads((tmp_path / "ci.json").read_text())
    checks = doc["checks"]
    assert checks["streams"] == 320 and checks["lost"] == 0 and checks["unexpected"] == 0, (seed, checks)
    assert checks["missing_outcomes"] == [], (seed, checks)  # every way of ending was exercised
    assert checks["drained"] and checks["internals_clear"]
    for wave in doc["waves"]:
        counts, server = wave["counts"], wave["server"]
        assert sum(counts[o] for o in OUTCOMES) == wave["streams"] == 160 and not wave["warmup"]
        assert counts["hung"] == counts["lost"] == 0 and not wave["unexpected_records"]
        assert (server["num_in_flight"], server["num_running"], server["num_waiting"]) == (0, 0, 0)
        assert server["kv_cache_usage"] == 0.0
        inside = server["internals"]
        assert inside["free_blocks"] == inside["num_blocks"] > 0
        assert inside["servicer_streams"] == inside["async_streams"] == inside["engine_groups"] == 0
        assert inside["compiled_steps"] > 0 and inside["python_objects"] > 0
        rss = wave["rss_mb"]
        assert 0 < rss["start"] <= rss["peak"] and rss["end"] <= rss["peak"]
        for action, outcomes in wave["by_action"].items():  # bad input ends as an error, nothing else does
            # (or, like any stream, refused for overload until its retries ran out)
            assert (set(outcomes) <= {"error", "rejected"}) if action == "invalid" else ("error" not in outcomes)
    assert any(w["by_action"].get("invalid", {}).get("error", 0) > 0 for w in doc["waves"])
    assert sum(w["counts"]["rejections"] for w in doc["waves"]) > 0  # overload answered with the retry hint
    assert code == (0 if checks["rss_stable"] else 1)
    table = (tmp_path / "ci.md").read_text()
    assert "`nexus-jax bench load --streams 160" in table and table.count("\n| ") >= 3 and "lost 0" in table
    assert "[bench load] wave 2/2" in capsys.readouterr().err


def test_only_loopback_targets():
    for good in ("127.0.0.1:50051", "localhost:1", "[::1]:8080", "127.5.0.1:9"):
        assert check_loopback(good) == good
    for bad in ("10.0.0.1:50051", "example.com:443", "0.0.0.0:1", "[2001:db8::1]:80"):
        with pytest.raises(ValueError, match="loopback"):
            check_loopback(bad)
    for malformed in ("127.0.0.1", "127.0.0.1:port"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            check_loopback(malformed)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="sum to <= 1"):
        LoadSettings(cancel=0.5, abort=0.6)
    with pytest.raises(ValueError, match="streams"):
        LoadSettings(streams=0)
    with pytest.raises(ValueError, match="warmup_waves"):
        LoadSettings(warmup_waves=-1)
    with pytest.raises(ValueError, match="deadline_s"):
        LoadSettings(deadline_s=(1.0, 0.5))


def test_plans_follow_the_fractions_and_are_reproducible():
    settings = LoadSettings(streams=4000, seed=random.randrange(100))
    plans = plan_streams(settings, 0, vocab_size=512)
    assert plans == plan_streams(settings, 0, vocab_size=512) != plan_streams(settings, 1, vocab_size=512)
    for action in ACTIONS:
        share = sum(p["action"] == action for p in plans) / len(plans)
        assert abs(share - getattr(settings, action)) < 0.03, action
    for p in plans:
        if p["action"] == "complete":
            assert 1 <= p["sampling"]["max_tokens"] <= settings.max_tokens and p["timeout"] is None
            assert 1 <= len(p["prompt"]) <= settings.prompt_len and all(3 <= t < 512 for t in p["prompt"])
        elif p["action"] == "invalid":
            bad = (not p["prompt"] or max(p["prompt"]) >= 512 or p["sampling"].get("top_p", 1.0) > 1.0
                   or p["sampling"].get("max_tokens", 0) > 10**6)
            assert bad, p
        else:
            assert p["sampling"] == {"max_tokens": settings.long_tokens, "ignore_eos": True}
            assert 1 <= p["act_after"] <= settings.act_after
            assert (p["timeout"] is not None) == (p["action"] == "deadline")
