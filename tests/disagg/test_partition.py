"""The partition controller chooses by predicted goodput: hand-computable fake latency models show when it
aggregates, when it splits and at which rung, that contention counts, hysteresis, and the decision log."""

import logging
import math

import numpy as np
import pytest

from nexus_jax.disagg.cost_model import CostModel
from nexus_jax.disagg.goodput import SHARED_WEIGHT_DECODE, SharedWeightDecode, predict, queue_ttfts, within_budget
from nexus_jax.disagg.partition import Decision, LoadState, PartitionController, Slo
from runner.model.config import ModelConfig

LADDER = (30, 50, 70)


class Fake:
    """Fixed step times: decode by its share, prefill by its share (both times `contention` when co-running), and
    one mixed step."""

    def __init__(self, mixed=0.06, contention=1.0, decode=None, prefill=None):
        self.mixed, self.contention = mixed, contention
        self.decode = decode or {30: 0.03, 50: 0.02, 70: 0.015, 100: 0.012}
        self.prefill = prefill or {70: 0.05, 50: 0.07, 30: 0.1, 100: 0.04}

    def predict_decode(self, share, batch, sum_kv, corun=False):
        return self.decode[share] * (self.contention if corun else 1)

    def predict_prefill(self, share, chunks, corun=False):
        return self.prefill[share] * (self.contention if corun else 1)

    def predict_mixed(self, decode_batch, sum_kv, chunks):
        return self.mixed


def load(waiting=((512, 0.0),), batch=8):
    """8 decodes, and prompts waiting (tokens, seconds waited); each prefill step takes one 512-token chunk."""
    return LoadState(batch, batch * 1024, [(512, 0)], 0.3, [tuple(w) for w in waiting])


def queue(n=30, waited=0.45):
    return [(512, waited)] * n


def test_aggregates_when_the_mixed_step_meets_tbt_and_the_queue_meets_ttft():
    c = PartitionController(Fake(mixed=0.04), LADDER, Slo(ttft=2.0, tbt=0.05))
    d = c.decide(load())
    # Every rung meets both SLOs too (goodput 9 each), but a tie goes to the aggregate.
    assert (d.mode, d.goodput) == ("aggregate", 9)
    assert d.predicted_decode == d.predicted_ttft == 0.04   # one 512-token prompt drained by one mixed step
    assert "does not beat the mixed step" in d.reason


def test_splits_when_the_mixed_step_breaks_tbt_and_the_split_meets_both():
    c = PartitionController(Fake(mixed=0.06), LADDER, Slo(ttft=2.0, tbt=0.05))
    d = c.decide(load())
    # Aggregate: TBT 60 ms > 50 ms, goodput 0. Rungs all meet both (goodput 9); d70 has the lowest risk:
    # max(15/50, 0.1/2) = 0.3, against d50's 0.4 and d30's 0.6.
    assert (d.label, d.goodput, d.predicted_decode, d.predicted_ttft) == ("split d70/p30", 9, 0.015, 0.1)


def test_a_long_queue_moves_toward_prefill_and_a_tbt_at_risk_toward_decode():
    # Decode steps of 30, 10 and 8 ms on 30, 50 and 70% of the SMs: first gaps (the handoff, 2.3 steps) of 69, 23
    # and 18.4 ms, all within an 80 ms TBT.
    c = PartitionController(Fake(mixed=0.1, decode={30: 0.03, 50: 0.010, 70: 0.008, 100: 0.006}), LADDER,
                            Slo(ttft=2.0, tbt=0.08))
    assert c.decide(load()).decode_share == 70
    # 30 prompts of one chunk each, waited 0.45 s: prompt k's TTFT is 0.45 + k * t_prefill. d30 (prefill 50 ms)
    # serves all 30 by 1.95 s; d50 (70 ms) 22 of them; d70 (100 ms) 15. Goodput 8 + 30 beats 8 + 22 by far more
    # than the hysteresis, so the controller leaves d70.
    d = c.decide(load(queue()))
    assert (d.decode_share, d.goodput) == (30, 38)
    assert d.predicted_ttft == pytest.approx(0.45 + 30 * 0.05)
    # A 28 ms TBT: d30's decode (30 ms) misses it, so its 38 requests count for nothing; d50 keeps 8 + 22 (its
    # first gap, 23 ms, meets even the SLO the hysteresis tightens to 25.2 ms).
    c.slo = Slo(ttft=2.0, tbt=0.028)
    d = c.decide(load(queue()))
    assert (d.decode_share, d.goodput) == (50, 30)


def test_a_first_gap_over_tbt_costs_the_waiting_prompts_of_a_split():
    # d50's step (20 ms) meets a 40 ms TBT, but a prompt that joins its decode waits up to 2.3 steps (46 ms) for
    # its second token: only the 8 running decodes count. The mixed step (35 ms) meets both: 9.
    c = PartitionController(Fake(mixed=0.035), (50,), Slo(ttft=2.0, tbt=0.04))
    split = predict(c.cost_model, load(), 50)
    assert split.first_gap == pytest.approx(0.046) and split.goodput(c.slo) == 8
    assert split.risk(c.slo) == pytest.approx(0.046 / 0.04)
    assert c.decide(load()).mode == "aggregate"
    assert predict(c.cost_model, load(waiting=()), 50).risk(c.slo) == pytest.approx(0.5)  # nobody joins
    # Paced, the first token goes out as the step of the second starts: one step (20 ms), and d50 serves all 9,
    # a tie with the mixed step (which wins ties), and a win once the mixed step misses TBT.
    paced = predict(c.cost_model, load(), 50, paced=True)
    assert paced.first_gap == pytest.approx(0.020) and paced.goodput(c.slo) == 9
    for mixed, mode in ((0.035, "aggregate"), (0.045, "split")):
        assert PartitionController(Fake(mixed=mixed), (50,), c.slo, paced_first_token=True).decide(load()).mode == mode


def test_a_decode_worker_on_shared_weights_is_predicted_slower_and_not_chosen_when_that_breaks_tbt():
    # Without its own copy of the weights a decode worker decodes 1.6-1.8x slower than the profile measured (where
    # the holder has room for only some copies): here decode-70 has none, and at 1.7 x 15 ms = 25.5 ms it breaks a
    # 25 ms TBT that it meets as profiled.
    fake = Fake(mixed=0.06)
    shared = SharedWeightDecode(fake, frozenset({70, 100}))
    assert shared.predict_decode(70, 8, 0, corun=True) == pytest.approx(SHARED_WEIGHT_DECODE * 0.015)
    assert shared.predict_decode(50, 8, 0, corun=True) == 0.02  # on its own copy: as profiled
    assert shared.predict_prefill(30, [(512, 0)]) == 0.1 and shared.predict_mixed(8, 0, [(512, 0)]) == 0.06
    assert PartitionController(fake, LADDER, Slo(ttft=2.0, tbt=0.025)).decide(load()).decode_share == 70
    d = PartitionController(shared, LADDER, Slo(ttft=2.0, tbt=0.025)).decide(load())
    assert (d.decode_share, d.predicted_decode) == (50, 0.02)


def test_co_run_contention_is_counted():
    # Alone on 30% of the SMs decode takes 40 ms (meets 50 ms); beside a prefill, 1.5x: 60 ms, a miss.
    slo = Slo(ttft=2.0, tbt=0.05)
    calm, contended = Fake(decode={30: 0.04}), Fake(decode={30: 0.04}, contention=1.5)
    assert PartitionController(calm, (30,), slo).decide(load()).label == "split d30/p70"
    d = PartitionController(contended, (30,), slo).decide(load())
    # Both miss TBT by the same 1.2x (60 ms), so the split does not beat the mixed step.
    assert d.mode == "aggregate"
    split = predict(contended, load(), 30)
    assert (split.tbt, split.t_prefill, split.goodput(slo)) == (pytest.approx(0.06), pytest.approx(0.075), 0)
    # The real cost model's co-run multiplier reaches the candidates as well.
    model = CostModel.analytic(ModelConfig.preset("llama-3.1-8b"), 989e12, 3.35e12)
    state = LoadState(64, 64 * 2048, [(2048, 0)], 0.3)
    assert predict(model, state, 50).tbt == pytest.approx(model.predict_decode(50, 64, 64 * 2048, corun=True))
    assert predict(model, state, 50).tbt > model.predict_decode(50, 64, 64 * 2048)


@pytest.mark.parametrize("hysteresis, switches", [(0.1, 1), (0.0, 19)])
def test_hysteresis_holds_a_steady_load_at_the_aggregate_boundary(hysteresis, switches):
    model = Fake()
    c = PartitionController(model, LADDER, Slo(ttft=2.0, tbt=0.05), hysteresis=hysteresis)
    modes = []
    for i in range(20):
        model.mixed = 0.049 if i % 2 == 0 else 0.051   # the mixed step hovers at TBT
        modes.append(c.decide(load()).mode)
    assert modes[:2] == ["aggregate", "split"]
    assert c.switches == switches   # without hysteresis it flaps on every step


@pytest.mark.parametrize("hysteresis, switches", [(0.1, 0), (0.0, 19)])
def test_hysteresis_holds_a_rung_when_the_next_is_barely_better(hysteresis, switches):
    a = {30: 0.03, 50: 0.0200, 70: 0.0205}
    b = {30: 0.03, 50: 0.0205, 70: 0.0200}
    model = Fake(decode=a)
    c = PartitionController(model, LADDER, Slo(ttft=2.0, tbt=0.05), hysteresis=hysteresis, allow_aggregate=False)
    shares = []
    for i in range(20):
        model.decode = a if i % 2 == 0 else b
        shares.append(c.decide(load()).decode_share)
    assert shares[0] == 50 and set(shares) <= {50, 70}
    assert c.switches == switches


def test_single_phase_modes():
    c = PartitionController(Fake(), LADDER)
    d = c.decide(LoadState(8, 8 * 1024, [], 0.3))
    assert (d.mode, d.decode_share, d.prefill_share, d.goodput) == ("decode_only", 100, 0, 8)
    p = c.decide(LoadState(0, 0, [(512, 0)], 0.1))
    assert (p.mode, p.decode_share, p.prefill_share, p.predicted_prefill) == ("prefill_only", 0, 100, 0.04)
    assert c.decide(LoadState(0, 0, [], 0.0)).objective == "idle"


def test_queue_ttfts():
    assert queue_ttfts([(100, 1.0), (300, 0.0)], 200, 0.1) == pytest.approx([1.05, 0.2])
    assert queue_ttfts([(100, 1.0)], 0, 0.1) == [math.inf]


def test_the_decision_log_is_bounded_and_exported(caplog):
    # decode steps whose first gaps (2.3 steps, at most 41.4 ms) meet even the hysteresis' 45 ms
    fake = Fake(decode={30: 0.018, 50: 0.015, 70: 0.012, 100: 0.01})
    c = PartitionController(fake, LADDER, Slo(ttft=2.0, tbt=0.05), log_size=5)
    with caplog.at_level(logging.DEBUG, logger="nexus_jax.disagg.partition"):
        for i in range(12):
            c.decide(load(queue() if i % 4 == 3 else ((512, 0.0),)))
    stats = c.stats()
    assert stats["decisions"] == 12 and len(stats["log"]) == 5 and stats["last"] == stats["log"][-1]
    last = stats["last"]
    assert set(last) >= {"time", "load", "candidates", "choice", "reason", "changed", "tbt", "ttft", "goodput"}
    assert last["load"]["waiting"] == 30 and last["choice"] == "split d30/p70"
    assert [x["candidate"] for x in last["candidates"]] == ["aggregate", "split d30/p70", "split d50/p50",
                                                             "split d70/p30"]
    assert {x["candidate"]: x["goodput"] for x in last["candidates"]}["split d30/p70"] == 38
    assert stats["slo"] == {"ttft": 2.0, "tbt": 0.05}
    # One line per decision: INFO when the choice changes, DEBUG when it holds.
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(caplog.records) == 12 and len(infos) == stats["switches"] + 1
    assert all(r.getMessage().startswith("partition: mode=") for r in caplog.records)


def test_only_ladder_values_under_random_loads():
    model = CostModel.analytic(ModelConfig.preset("llama-3.1-8b"), 989e12, 3.35e12)
    rng = np.random.default_rng(1)
    c = PartitionController(model, (20, 30, 40, 60))
    for _ in range(100):
        batch = int(rng.integers(0, 257))
        chunks = [(int(rng.integers(16, 8193)), 0)] * int(rng.integers(0, 3))
        waiting = [(n, float(rng.uniform(0, 3))) for n, _ in chunks]
        d = c.decide(LoadState(batch, batch * int(rng.integers(16, 4097)), chunks, float(rng.uniform(0, 1)),
                               waiting))
        assert isinstance(d, Decision)
        if d.mode == "split":
            assert d.decode_share in (20, 30, 40, 60) and d.decode_share + d.prefill_share == 100
    assert c.stats()["decisions"] == 100 and sum(c.stats()["modes"].values()) == 100


@pytest.mark.parametrize("kwargs", [{"ladder": (0, 40)}, {"ladder": (40, 100)}, {"ladder": ()},
                                    {"ladder": (40.5,)}, {"hysteresis": -0.1}, {"hysteresis": 1.0},
                                    {"log_size": 0}])
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        PartitionController(Fake(), **kwargs)


def test_bad_slo_and_state_raise():
    for ttft, tbt in ((-1, 0.05), (2.0, -0.05), (2.0, 0)):
        with pytest.raises(ValueError, match="SLO"):
            Slo(ttft, tbt)
    with pytest.raises(ValueError):
        LoadState(1, 10, [], 1.5)
    with pytest.raises(ValueError):
        LoadState(-1, 10, [], 0.5)
    with pytest.raises(ValueError, match="waiting"):
        LoadState(1, 10, [], 0.5, [(10, -1.0)])


def test_the_engine_config_sets_both_slos():
    from nexus_jax import EngineConfig
    from nexus_jax.disagg.ladder import SmLadder
    from nexus_jax.disagg.setup import make_controller

    config = EngineConfig(slo_ttft=0.7, slo_tbt=0.03, aggregate_when_safe=False)
    c = make_controller(config, Fake(decode={30: 0.012, 50: 0.010, 70: 0.008, 100: 0.006}), SmLadder(LADDER))
    assert (c.slo, c.allow_aggregate) == (Slo(ttft=0.7, tbt=0.03), False)
    # A TTFT SLO of 0.7 s: of 30 queued prompts (waited 0.45 s), d30's 50 ms prefill serves 5 in time
    # (0.45 + 5 * 0.05 = 0.70), d50's and d70's only 3 and 2; d30's 12 ms decode (first gap 27.6 ms) meets 30 ms.
    assert c.decide(load(queue())).goodput == 8 + 5
    for bad in (0, -1.0, float("inf"), float("nan"), True, "2"):
        with pytest.raises(ValueError, match="slo_ttft"):
            EngineConfig(slo_ttft=bad)


class PerToken(Fake):
    """A mixed step of 8 ms plus 40 us per prompt token: 28 ms at 500 tokens, 90 ms at 2048."""

    def predict_mixed(self, decode_batch, sum_kv, chunks):
        return 0.008 + 4e-5 * sum(n for n, _ in chunks)


def test_the_aggregate_is_judged_at_its_own_budget_not_the_split_prefill_plan():
    chunks = [(1500, 0), (548, 0)]  # the split's prefill plan: 2048 tokens
    waiting = [(1500, 0.0), (548, 0.0)]
    c = PartitionController(PerToken(), LADDER, Slo(ttft=2.0, tbt=0.03))
    # At the split's budget the mixed step takes 90 ms (> 30 ms TBT): a split wins.
    assert c.decide(LoadState(8, 8 * 1024, chunks, 0.3, waiting)).mode == "split"
    # At chunked prefill's budget (512 tokens, 8 of them decodes) it takes 28 ms: the aggregate meets both SLOs.
    c = PartitionController(PerToken(), LADDER, Slo(ttft=2.0, tbt=0.03))
    state = LoadState(8, 8 * 1024, chunks, 0.3, waiting, aggregate_chunks=within_budget(chunks, 504))
    d = c.decide(state)
    assert (d.mode, d.predicted_decode) == ("aggregate", pytest.approx(0.008 + 4e-5 * 504))
    # its TTFTs drain the queue 504 tokens per mixed step: 2048 tokens in 4.06 steps
    assert d.predicted_ttft == pytest.approx(2048 / 504 * (0.008 + 4e-5 * 504))


def test_within_budget_keeps_the_plan_order_and_cuts_the_last_chunk():
    assert within_budget([(300, 0), (300, 64), (50, 0)], 400) == [(300, 0), (100, 64)]
    assert within_budget([(300, 0)], 300) == [(300, 0)]
    assert within_budget([(300, 0)], 0) == within_budget([(300, 0)], -5) == []
    assert LoadState(1, 10, [(7, 0)], 0.0).aggregate_chunks == [(7, 0)]  # by default, the prefill plan's
