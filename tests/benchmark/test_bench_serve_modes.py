"""The comparison's bookkeeping (benchmarks/bench_serve_modes.py): which baseline is the best, which rate is
sustainable, which sweep saturated, and the commands it runs."""

import sys

import pytest

from benchmarks import bench_serve_modes as bsm

MIX = bsm.WORKLOADS["mix"]


def run(rate: float, achieved: float, p90_ttft: float, p99_itl: float, goodput: float, failed: int = 0) -> dict:
    return {"phase": "sweep", "request_rate": str(rate),
            "summary": {"completed": 200, "failed": failed, "request_throughput": achieved, "goodput": goodput,
                        "ttft": {"mean": p90_ttft / 2, "median": p90_ttft / 2, "p90": p90_ttft, "p99": p90_ttft},
                        "itl": {"mean": 0.01, "median": 0.01, "p90": p99_itl, "p99": p99_itl}}}


DOCS = {
    # meets up to 3, fails at 4, flattens past it
    "agg-512-arrival": {"runs": [run(1, 1, 0.3, 0.02, 1), run(2, 2, 0.4, 0.03, 2), run(3, 2.9, 0.9, 0.04, 2.8),
                                 run(4, 3.3, 3.0, 0.04, 1.0), run(5, 3.4, 9.0, 0.04, 0.2)]},
    # meets up to 3 too, with less goodput there: not the best
    "agg-2048-spf": {"runs": [run(1, 1, 0.2, 0.04, 1), run(2, 2, 0.3, 0.045, 1.9), run(3, 2.9, 0.5, 0.049, 2.5),
                              run(4, 3.8, 0.9, 0.08, 0.5)]},
    # fails at 2 although 3 would pass: sustainable is 1, and still climbing at the top: not saturated
    "dynamic": {"runs": [run(1, 1, 0.2, 0.02, 1), run(2, 2, 0.2, 0.06, 1), run(3, 3, 0.3, 0.02, 3)]},
}


def test_sustainable_rate_stops_at_the_first_failing_rate():
    assert bsm.sustainable_rate(DOCS["agg-512-arrival"], MIX.targets) == 3
    assert bsm.sustainable_rate(DOCS["dynamic"], MIX.targets) == 1
    failed = {"runs": [run(1, 1, 0.2, 0.02, 1, failed=1)]}
    assert bsm.sustainable_rate(failed, MIX.targets) is None


def test_best_baseline_breaks_ties_by_goodput_and_ignores_split_modes():
    assert bsm.best_baseline(DOCS, MIX.targets) == "agg-512-arrival"
    assert bsm.best_baseline({"dynamic": DOCS["dynamic"]}, MIX.targets) is None


def test_saturation_needs_the_top_rates_to_flatten():
    assert bsm.saturated(DOCS["agg-512-arrival"]) and not bsm.saturated(DOCS["dynamic"])


def test_summary_compares_every_mode_with_the_best_baseline():
    text = bsm.summarize("mix", DOCS)
    assert "Best baseline: **agg-512-arrival** (sustainable 3.0 req/s)" in text
    assert "| dynamic | 1 | 0.33 | 1: 1.00, 2: 0.50, 3: 1.07 | **no** |" in text
    assert "Not run:" in text and "static-50" in text


def test_commands_carry_the_mode_and_the_workloads_slos():
    cmd = bsm.command("tight", "agg-256-spf", "8b", "/o")
    joined = " ".join(cmd)
    assert "--max-num-batched-tokens 256" in joined and "prefill_order=spf" in joined
    assert "--slo tbt=0.03" in joined and "slo_tbt=0.03" in joined and "--dataset chat-long" in joined
    assert "--num-prompts 200" in joined and cmd[-1] == "/o/tight"
    for scale in ("tiny", "8b"):  # a split that cannot start fails its mode instead of running aggregated
        split = " ".join(bsm.command("mix", "dynamic", scale, "/o"))
        assert "disaggregation=on" in split and "disaggregation=auto" not in split
    # static-50, static-50-arrival, static-30, static-50-unpaced, static-50-loop, sync-512, dynamic, dynamic-arrival,
    # overlap-50-p{80,100}-{512,1024}
    assert len(bsm.MODES) == 2 * len(bsm.BUDGETS) + 12
    overlap = " ".join(bsm.command("tight", "overlap-50-p80-1024", "8b", "/o"))
    assert "split_prefill_share=80" in overlap and "--max-num-batched-tokens 1024" in overlap
    assert "async_scheduling=false" in " ".join(bsm.command("mix", "sync-512", "8b", "/o"))
    assert "prefill_order=arrival" in " ".join(bsm.command("tight", "static-50-arrival", "8b", "/o"))
    assert "pace_first_token=false" in " ".join(bsm.command("tight", "static-50-unpaced", "8b", "/o"))


def test_the_synchronous_loop_is_an_ablation_not_a_baseline():
    summary = {"request_throughput": 4.0, "goodput": 4.0, "failed": 0, "completed": 200, "ttft": {"p90": 0.1},
               "itl": {"p99": 0.01}}
    docs = {mode: {"runs": [{"phase": "sweep", "request_rate": 4, "summary": dict(summary)}]}
            for mode in ("sync-512", "agg-512-arrival")}
    docs["sync-512"]["runs"][0]["summary"]["goodput"] = 9.0  # even when it would win
    assert bsm.best_baseline(docs, bsm.WORKLOADS["mix"].targets) == "agg-512-arrival"


def test_engine_args_reach_every_mode_after_its_own():
    cmd = bsm.command("mix", "static-50", "8b", "/o", engine_args=("decode_weights=private",))
    assert cmd[cmd.index("decode_weights=private") - 1] == "--engine-arg"
    assert cmd.index("aggregate_when_safe=false") < cmd.index("decode_weights=private")


def test_a_failing_mode_does_not_stop_the_modes_after_it(tmp_path, monkeypatch):
    ran = []

    def command(workload, mode, *args, **kwargs):
        ran.append(mode)
        code = "raise SystemExit(3)" if mode == "static-50" else "pass"
        return [sys.executable, "-c", code]
    monkeypatch.setattr(bsm, "command", command)
    monkeypatch.setattr(sys, "argv", ["bsm", "run", "mix", "static-50", "agg-512-arrival", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="failed: static-50 \\(exit status 3\\)"):
        bsm.main()
    assert ran == ["static-50", "agg-512-arrival"]
    assert (tmp_path / "mix" / "static-50.failed").read_text() == "exit status 3\n"
    assert not (tmp_path / "mix" / "agg-512-arrival.failed").exists()
    text = bsm.summarize("mix", DOCS, failed=("static-50",))
    assert "Failed (see their logs): static-50." in text
    assert "static-50" not in text.split("Not run: ")[1].rstrip(".").split(", ")


def test_goodput_is_recounted_from_the_requests_at_other_tbt_slos():
    def record(ttft: float, gap: float) -> dict:
        return {"prompt_len": 8, "output_len": 3, "start": 0.0, "token_times": [ttft, ttft + gap, ttft + gap + 0.01],
                "end": ttft + gap + 0.01, "success": True}
    # largest gaps 22, 28 and 33 ms; the third request also misses the 2 s TTFT
    timed = run(16, 1.5, 0.5, 0.03, 1.0)
    timed["records"] = [record(0.1, 0.022), record(0.2, 0.028), record(2.5, 0.033)]
    timed["summary"]["duration_s"] = 2.0
    assert [bsm.goodput_at(timed, 2.0, t) for t in (0.02, 0.025, 0.03, 0.04)] == [0.0, 0.5, 1.0, 1.0]
    assert bsm.goodput_at(run(16, 1.5, 0.5, 0.03, 1.0), 2.0, 0.03) is None  # a run saved without its records
    text = bsm.summarize("tight", {"static-50": {"runs": [timed]}})
    assert "| mode | rate | TBT 20 ms | TBT 25 ms | TBT 30 ms | TBT 35 ms | TBT 40 ms |" in text
    assert "| static-50 | 16 | 0.00 | 0.50 | 1.00 | 1.00 | 1.00 |" in text
