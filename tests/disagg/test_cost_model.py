"""The per-SM-share latency model: fits recover known coefficients, interpolation, contention, persistence."""

import json
import math

import numpy as np
import pytest

from nexus_jax.disagg.cost_model import CostModel, profile_path, split_points
from runner.model.config import ModelConfig

# A known model: share -> coefficients (decode a, b, c; prefill a, b, c, d), H100-8B-like magnitudes.
DECODE = {20: (1.3e-7, 4e-5, 8e-3), 50: (8e-8, 2e-5, 6e-3), 100: (6e-8, 1e-5, 5.5e-3)}
PREFILL = {20: (5e-11, 1e-10, 1.4e-4, 9e-3), 50: (2e-11, 4e-11, 5.6e-5, 7e-3), 100: (1e-11, 2e-11, 2.8e-5, 6e-3)}
CONTENTION = {20: 1.3, 50: 1.2}
MIXED_CONSTANT = 6.5e-3


def truth() -> CostModel:
    return CostModel(DECODE, PREFILL, CONTENTION, {50: 1.1}, MIXED_CONSTANT)


def synthetic_points(rng, noise=0.02, per_share=40):
    model, points = truth(), []

    def add(p, corun=False):
        t = model.predict_point({**p, "corun": corun}) * (1 + noise * rng.standard_normal())
        points.append({**p, "corun": corun, "seconds": t})

    for share in DECODE:
        for _ in range(per_share):
            batch = int(rng.integers(1, 257))
            add({"kind": "decode", "share": share, "batch": batch,
                 "sum_kv": int(batch * rng.integers(16, 4097))})
            chunks = [(int(rng.integers(16, 8193)), int(rng.choice([0, rng.integers(0, 8193)])))
                      for _ in range(int(rng.integers(1, 4)))]
            add({"kind": "prefill", "share": share, "chunks": chunks})
        for _ in range(6):
            if share in CONTENTION:
                add({"kind": "decode", "share": share, "batch": 64, "sum_kv": int(rng.integers(1e4, 3e5))}, True)
    for _ in range(8):
        add({"kind": "mixed", "share": 100, "batch": int(rng.integers(1, 257)), "sum_kv": int(rng.integers(1e3, 5e5)),
             "chunks": [(int(rng.integers(64, 4097)), 0)]})
    return points


def test_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    fitted = CostModel.fit(synthetic_points(rng))
    for share in DECODE:
        # The terms that carry the time come back closely under 2% noise per point (the attention terms of
        # prefill are under 1% of these steps, so noise hides them; the noise-free test checks them exactly).
        assert fitted.decode[share][0] == pytest.approx(DECODE[share][0], rel=0.1)
        assert fitted.decode[share][2] == pytest.approx(DECODE[share][2], rel=0.1)
        assert fitted.prefill[share][2] == pytest.approx(PREFILL[share][2], rel=0.05)
        assert fitted.prefill[share][3] == pytest.approx(PREFILL[share][3], rel=0.2)
    assert fitted.decode_contention[20] == pytest.approx(1.3, rel=0.05)
    assert fitted.decode_contention[50] == pytest.approx(1.2, rel=0.05)
    assert fitted.mixed_constant == pytest.approx(MIXED_CONSTANT, rel=0.25)
    ev = fitted.evaluate(synthetic_points(np.random.default_rng(1)))
    assert ev["median"] < 0.03 and ev["p90"] < 0.06
    assert set(ev["by_kind"]) == {"decode", "prefill", "mixed"}
    assert fitted.profiled and fitted.metadata["shares"] == [20, 50, 100]


def test_noise_free_fit_is_exact():
    points = synthetic_points(np.random.default_rng(2), noise=0.0)
    fitted = CostModel.fit(points)
    assert fitted.evaluate(points)["max"] < 1e-6
    for share in DECODE:
        np.testing.assert_allclose(fitted.decode[share], DECODE[share], rtol=1e-4)
        np.testing.assert_allclose(fitted.prefill[share], PREFILL[share], rtol=1e-3)


def test_interpolation_between_and_outside_measured_shares():
    m = truth()
    w = (35 - 20) / (50 - 20)
    expected = (1 - w) * m.predict_decode(20, 64, 100_000) + w * m.predict_decode(50, 64, 100_000)
    assert m.predict_decode(35, 64, 100_000) == pytest.approx(expected)
    chunks = [(2048, 1024), (512, 0)]
    expected = 0.5 * m.predict_prefill(50, chunks) + 0.5 * m.predict_prefill(100, chunks)
    assert m.predict_prefill(75, chunks) == pytest.approx(expected)
    assert m.predict_prefill(10, chunks) == m.predict_prefill(20, chunks)   # clamped below
    # Contention: measured at 20 and 50, clamped above 50; no table at all means 1.0.
    assert m.predict_decode(80, 8, 1000, corun=True) == pytest.approx(1.2 * m.predict_decode(80, 8, 1000))
    plain = CostModel(DECODE, PREFILL)
    assert plain.predict_decode(40, 8, 1000, corun=True) == plain.predict_decode(40, 8, 1000)


def test_prediction_forms():
    m = truth()
    a, b, c = DECODE[100]
    assert m.predict_decode(100, 10, 5000) == pytest.approx(a * 5000 + b * 10 + c)
    pa, pb, pc, pd = PREFILL[100]
    chunks = [(100, 50), (30, 0)]
    assert m.predict_prefill(100, chunks) == pytest.approx(pa * (100**2 + 30**2) + pb * 100 * 50 + pc * 130 + pd)
    mixed = a * 5000 + b * 10 + pa * (100**2 + 30**2) + pb * 5000 + pc * 130 + MIXED_CONSTANT
    assert m.predict_mixed(10, 5000, chunks) == pytest.approx(mixed)
    assert m.predict_mixed(0, 0, chunks) == m.predict_prefill(100, chunks)
    assert m.predict_mixed(10, 5000, []) == m.predict_decode(100, 10, 5000)
    assert m.predict_decode(50, 0, 0) == 0.0 and m.predict_prefill(50, []) == 0.0
    # Without a fitted mixed constant the step pays the larger of the two constants once.
    composed = CostModel(DECODE, PREFILL)
    assert composed.predict_mixed(10, 5000, chunks) == pytest.approx(mixed - MIXED_CONSTANT + max(c, pd))


def test_save_load_round_trip(tmp_path):
    m = CostModel.fit(synthetic_points(np.random.default_rng(3)), {"gpu": "NVIDIA H100 80GB HBM3", "model": "x"})
    path = tmp_path / "sub" / "p.json"
    m.save(path)
    back = CostModel.load(path)
    assert back.decode == m.decode and back.prefill == m.prefill
    assert back.decode_contention == m.decode_contention and back.mixed_constant == m.mixed_constant
    assert back.metadata["gpu"] == "NVIDIA H100 80GB HBM3" and back.metadata["shares"] == [20, 50, 100]
    for share in (20, 33, 100):
        assert back.predict_prefill(share, [(1000, 500)]) == m.predict_prefill(share, [(1000, 500)])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        CostModel.load(bad)
    with pytest.raises(FileNotFoundError):
        CostModel.load(tmp_path / "missing.json")


def test_profile_path_names_gpu_and_model(tmp_path):
    p = profile_path("NVIDIA H100 80GB HBM3", "/ckpts/Llama-3.1-8B", tmp_path)
    assert p == tmp_path / "nvidia-h100-80gb-hbm3__llama-3.1-8b.json"


def test_split_points_holds_out_per_group():
    points = synthetic_points(np.random.default_rng(4))
    train, test = split_points(points, 0.2, seed=0)
    assert len(train) + len(test) == len(points)
    assert {id(p) for p in train}.isdisjoint({id(p) for p in test})
    assert 0.15 < len(test) / len(points) < 0.25
    CostModel.fit(train)   # every group kept enough training points
    tiny = [p for p in points if p["kind"] == "decode" and p["share"] == 20 and not p["corun"]][:4]
    tr, te = split_points(tiny, 0.5)
    assert len(tr) == 3 and len(te) == 1   # a decode fit needs 3 points
    with pytest.raises(ValueError):
        split_points(points, 1.0)


def test_analytic_default_is_labelled_and_plausible():
    cfg = ModelConfig.preset("llama-3.1-8b")
    m = CostModel.analytic(cfg, peak_flops=700e12, hbm_bw=3.0e12)
    assert not m.profiled and "unprofiled" in m.metadata["source"]
    # 8192-token prefill ~0.2 s at 100%; compute-bound, so about twice as long on half the SMs.
    t100 = m.predict_prefill(100, [(8192, 0)])
    assert 0.12 < t100 < 0.4
    assert m.predict_prefill(50, [(8192, 0)]) / t100 == pytest.approx(2.0, rel=0.1)
    # Decode B=64 x 2048: weights 16 GB + KV 17 GB at 3 TB/s ~ 11 ms; nearly flat down to a quarter of the SMs.
    d100 = m.predict_decode(100, 64, 64 * 2048)
    assert 0.008 < d100 < 0.02
    assert m.predict_decode(30, 64, 64 * 2048) / d100 < 1.25
    quarter = CostModel.analytic(cfg, peak_flops=700e12, hbm_bw=3.0e12, shares=(25, 100))
    assert quarter.predict_decode(25, 64, 64 * 2048) / d100 == pytest.approx(2443 / 2026, rel=0.05)
    assert m.predict_decode(40, 64, 64 * 2048, corun=True) > m.predict_decode(40, 64, 64 * 2048)
    assert math.isfinite(m.predict_mixed(64, 64 * 2048, [(2048, 0)]))


def test_bad_input_raises():
    m = truth()
    for share in (0, -5, 101):
        with pytest.raises(ValueError, match="share"):
            m.predict_decode(share, 1, 10)
    with pytest.raises(ValueError):
        m.predict_prefill(50, [(0, 10)])
    with pytest.raises(ValueError):
        m.predict_decode(50, -1, 10)
    with pytest.raises(ValueError, match="at least 3"):
        CostModel.fit([{"kind": "decode", "share": 50, "batch": 1, "sum_kv": 10, "seconds": 0.01},
                       {"kind": "prefill", "share": 50, "chunks": [(10, 0)], "seconds": 0.01}])
    with pytest.raises(ValueError, match="seconds"):
        CostModel.fit([{"kind": "decode", "share": 50, "batch": 1, "sum_kv": 10, "seconds": float("nan")}])
    with pytest.raises(ValueError, match="kind"):
        CostModel.fit([{"kind": "other", "share": 50, "seconds": 1.0}])
    with pytest.raises(ValueError, match="non-negative"):
        CostModel({50: (1.0, -1.0, 0.0)}, PREFILL)
    with pytest.raises(ValueError, match="no prefill"):
        CostModel(DECODE, {})
    with pytest.raises(ValueError):
        CostModel.analytic(ModelConfig.preset("tiny"), 0, 1e12)


def test_an_unprofiled_gpu_gets_its_own_datasheet_and_an_unknown_one_the_h100s():
    from nexus_jax.disagg.setup import datasheet
    assert datasheet("NVIDIA H200")[2] == 4.8e12 and datasheet("NVIDIA H100 80GB HBM3")[2] == 3.35e12
    assert datasheet("NVIDIA H200 NVL")[0] == "H200"  # the H200's name contains no "H100"
    assert datasheet("some new GPU")[0] == "H100"
