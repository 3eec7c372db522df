"""The partition controller: aggregate when safe, Nexus objectives, greedy search, hysteresis, validation."""

import logging

import numpy as np
import pytest

from nexus_jax.disagg.cost_model import CostModel
from nexus_jax.disagg.partition import Decision, LoadState, PartitionController, Slo
from runner.model.config import ModelConfig

LADDER = (20, 30, 40, 50, 60, 70, 80)


@pytest.fixture(scope="module")
def h100_8b():
    return CostModel.analytic(ModelConfig.preset("llama-3.1-8b"), peak_flops=700e12, hbm_bw=3.0e12)


class TableModel:
    """Latencies looked up by the load's sum_kv (a label here) and the share: full control over the optimum."""

    def __init__(self, decode: dict, prefill: dict, mixed: float = 1.0):
        self.decode, self.prefill, self.mixed = decode, prefill, mixed

    def predict_decode(self, share, batch, sum_kv, corun=False):
        return self.decode[sum_kv][share]

    def predict_prefill(self, share, chunks, corun=False):
        return self.prefill[share]

    def predict_mixed(self, decode_batch, sum_kv, chunks):
        return self.mixed


def load(batch=64, ctx=2048, chunks=((2048, 0),), kv=0.3):
    return LoadState(batch, batch * ctx, list(chunks), kv)


def test_aggregate_when_mixed_step_meets_tbt_else_split(h100_8b):
    c = PartitionController(h100_8b, LADDER, Slo(tbt=0.05))
    small = c.decide(load(chunks=[(128, 0)]))
    assert small.mode == "aggregate" and small.objective == "aggregate-safe"
    assert small.predicted_decode == pytest.approx(h100_8b.predict_mixed(64, 64 * 2048, [(128, 0)]))
    assert small.predicted_decode <= 0.05
    big = c.decide(load(chunks=[(8192, 0)]))
    assert h100_8b.predict_mixed(64, 64 * 2048, [(8192, 0)]) > 0.05
    assert big.mode == "split" and big.decode_share in LADDER and big.prefill_share == 100 - big.decode_share
    assert big.predicted_decode <= 0.05
    no_agg = PartitionController(h100_8b, LADDER, Slo(tbt=0.05), allow_aggregate=False)
    assert no_agg.decide(load(chunks=[(128, 0)])).mode == "split"


def test_single_phase_modes(h100_8b):
    c = PartitionController(h100_8b, LADDER)
    d = c.decide(load(chunks=[]))
    assert (d.mode, d.decode_share, d.prefill_share) == ("decode_only", 100, 0)
    p = c.decide(LoadState(0, 0, [(512, 0)], 0.1))
    assert (p.mode, p.decode_share, p.prefill_share) == ("prefill_only", 0, 100)
    assert p.predicted_prefill == pytest.approx(h100_8b.predict_prefill(100, [(512, 0)]))


def brute_force(model, state, ladder, slo, decode_slack=1.1, prefill_slack=1.3, kv_threshold=0.7):
    """The optimum by evaluating every rung, straight from the objective's definition."""
    dec = {d: model.predict_decode(d, state.decode_batch, state.decode_sum_kv, corun=True) for d in ladder}
    pre = {d: model.predict_prefill(100 - d, state.prefill_chunks, corun=True) for d in ladder}
    if min(dec.values()) > slo.tbt:
        prefill_priority = min(ladder, key=dec.get)
    else:
        ok = [d for d in ladder if dec[d] <= min(decode_slack * min(dec.values()), slo.tbt)]
        prefill_priority = min(ok, key=pre.get)
    if state.kv_usage <= kv_threshold:
        return prefill_priority
    ok = [d for d in ladder if pre[d] <= prefill_slack * min(pre.values())]
    best = min(ok, key=dec.get)
    if dec[best] > slo.tbt:
        meets = [d for d in ladder if dec[d] <= slo.tbt]
        best = min(meets) if meets else min(ladder, key=dec.get)
    return max(best, prefill_priority)  # under KV pressure decode never gets fewer SMs than prefill-priority's


def test_greedy_walk_matches_exhaustive_search_with_few_evaluations(h100_8b):
    rng = np.random.default_rng(0)
    ladder = (10, 20, 25, 30, 40, 50, 60, 70, 80, 90)
    for _ in range(300):
        state = LoadState(int(rng.integers(1, 257)), 0, [(int(rng.integers(64, 8193)), int(rng.integers(0, 8193)))],
                          float(rng.uniform(0, 1)))
        state.decode_sum_kv = state.decode_batch * int(rng.integers(64, 8193))
        slo = Slo(tbt=float(rng.choice([0.015, 0.03, 0.05, 0.1])))
        c = PartitionController(h100_8b, ladder, slo, allow_aggregate=False, hysteresis=0.0)
        d = c.decide(state)
        assert d.decode_share == brute_force(h100_8b, state, ladder, slo), (state, slo, d)
    # A steady load, decided again from where it is, costs a few evaluations, not the whole ladder's 20.
    c = PartitionController(h100_8b, ladder, allow_aggregate=False)
    c.decide(load())
    before = c.evaluations
    c.decide(load())
    assert c.evaluations - before <= 4


def test_objective_switches_at_kv_threshold(h100_8b):
    c = PartitionController(h100_8b, LADDER, Slo(tbt=0.05), allow_aggregate=False, kv_threshold=0.7)
    low = c.decide(load(kv=0.7))
    assert low.objective == "prefill-priority"
    high = c.decide(load(kv=0.71))
    assert high.objective == "decode-priority"
    # Prefill-priority keeps decode within its slack. With decode nearly flat in the share and prefill linear,
    # the 1.3x prefill slack alone would stop decode-priority at 30% (fewer SMs than prefill-priority gives
    # decode); it is raised to prefill-priority's rung instead.
    best_decode = h100_8b.predict_decode(80, 64, 64 * 2048, corun=True)
    assert low.predicted_decode <= 1.1 * best_decode
    assert (low.decode_share, high.decode_share) == (40, 40) and "raised to prefill-priority" in high.reason
    for state, d in ((load(kv=0.7), low), (load(kv=0.71), high)):
        assert d.decode_share == brute_force(h100_8b, state, LADDER, Slo(tbt=0.05))
    # Back to prefill-priority only clearly below the threshold.
    assert c.decide(load(kv=0.68)).objective == "decode-priority"
    assert c.decide(load(kv=0.6)).objective == "prefill-priority"


def test_no_share_meets_tbt_picks_fastest_decode(h100_8b):
    c = PartitionController(h100_8b, LADDER, Slo(tbt=0.001), allow_aggregate=False)
    for kv in (0.2, 0.9):
        d = c.decide(load(kv=kv))
        assert d.decode_share == 80 and "no ladder share meets TBT" in d.reason


def alternating_model():
    # Load A (label 1): the optimum rung is 30; load B (label 2): 40. Prefill gains only ~4.5% from 40 to 30.
    decode = {1: {20: 0.030, 30: 0.021, 40: 0.0205, 60: 0.020}, 2: {20: 0.030, 30: 0.023, 40: 0.0205, 60: 0.020}}
    prefill = {80: 0.100, 70: 0.105, 60: 0.110, 40: 0.150}
    return TableModel(decode, prefill)


@pytest.mark.parametrize("hysteresis, max_switches", [(0.1, 0), (0.0, 19)])
def test_hysteresis_prevents_flapping(hysteresis, max_switches):
    c = PartitionController(alternating_model(), (20, 30, 40, 60), Slo(tbt=0.05), allow_aggregate=False,
                            hysteresis=hysteresis)
    shares = [c.decide(LoadState(8, 1 + i % 2, [(512, 0)], 0.2)).decode_share for i in range(20)]
    assert shares[0] == 30
    assert c.switches == max_switches   # without hysteresis it flaps on every step
    assert set(shares) <= {30, 40}


def test_hysteresis_yields_to_a_large_gain_and_to_tbt():
    decode = {1: {20: 0.030, 30: 0.021, 40: 0.0205, 60: 0.020}, 2: {20: 0.021, 30: 0.0205, 40: 0.0205, 60: 0.020}}
    prefill = {80: 0.100, 70: 0.150, 60: 0.200, 40: 0.300}
    c = PartitionController(TableModel(decode, prefill), (20, 30, 40, 60), Slo(tbt=0.05), allow_aggregate=False)
    assert c.decide(LoadState(8, 1, [(512, 0)], 0.2)).decode_share == 30
    assert c.decide(LoadState(8, 2, [(512, 0)], 0.2)).decode_share == 20   # prefill 33% faster: worth moving
    # A rung that would miss TBT is left even though the optimum gains little.
    tight = {1: {20: 0.030, 30: 0.021, 40: 0.0205, 60: 0.020}, 2: {20: 0.030, 30: 0.0215, 40: 0.0205, 60: 0.020}}
    c = PartitionController(TableModel(tight, {80: 0.1, 70: 0.105, 60: 0.11, 40: 0.15}), (20, 30, 40, 60),
                            Slo(tbt=0.0212), allow_aggregate=False)
    assert c.decide(LoadState(8, 1, [(512, 0)], 0.2)).decode_share == 30
    assert c.decide(LoadState(8, 2, [(512, 0)], 0.2)).decode_share == 40


def test_aggregate_split_boundary_has_a_margin():
    model = TableModel({1: {20: 0.03, 40: 0.02}}, {80: 0.1, 60: 0.12}, mixed=0.052)
    c = PartitionController(model, (20, 40), Slo(tbt=0.05))
    assert c.decide(LoadState(8, 1, [(512, 0)], 0.2)).mode == "split"
    model.mixed = 0.048   # under TBT, but not by the 10% margin: stay split
    assert c.decide(LoadState(8, 1, [(512, 0)], 0.2)).mode == "split"
    model.mixed = 0.04
    assert c.decide(LoadState(8, 1, [(512, 0)], 0.2)).mode == "aggregate"


def test_only_ladder_values_and_stats_and_logging(h100_8b, caplog):
    rng = np.random.default_rng(1)
    c = PartitionController(h100_8b, (20, 30, 40, 60))
    with caplog.at_level(logging.DEBUG, logger="nexus_jax.disagg.partition"):
        for _ in range(100):
            batch = int(rng.integers(0, 257))
            chunks = [(int(rng.integers(16, 8193)), 0)] * int(rng.integers(0, 3))
            d = c.decide(LoadState(batch, batch * int(rng.integers(16, 4097)), chunks, float(rng.uniform(0, 1))))
            assert isinstance(d, Decision)
            if d.mode == "split":
                assert d.decode_share in (20, 30, 40, 60) and d.decode_share + d.prefill_share == 100
    stats = c.stats()
    assert stats["decisions"] == 100 and sum(stats["modes"].values()) == 100
    assert 0 < stats["switches"] < 100
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == stats["switches"] + 1
    assert all(r.getMessage().startswith("partition: mode=") for r in caplog.records)
    assert "changed=True" in infos[0].getMessage()


@pytest.mark.parametrize("kwargs", [{"ladder": (0, 40)}, {"ladder": (40, 100)}, {"ladder": ()},
                                    {"ladder": (40.5,)}, {"kv_threshold": 1.5}, {"decode_slack": 0.9},
                                    {"hysteresis": -0.1}])
def test_bad_config_raises(h100_8b, kwargs):
    with pytest.raises(ValueError):
        PartitionController(h100_8b, **kwargs)


def test_bad_slo_and_state_raise():
    for ttft, tbt in ((-1, 0.05), (2.0, -0.05), (2.0, 0)):
        with pytest.raises(ValueError, match="SLO"):
            Slo(ttft, tbt)
    with pytest.raises(ValueError):
        LoadState(1, 10, [], 1.5)
    with pytest.raises(ValueError):
        LoadState(-1, 10, [], 0.5)
