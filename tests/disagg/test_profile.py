"""`nexus-jax profile --quick` on the CPU (share 100, in-process) and the profiler's pieces."""

import dataclasses
import json
import math

import pytest

from nexus_jax.cli.main import main
from nexus_jax.disagg.cost_model import CostModel
from nexus_jax.disagg.profile import ProfileSettings, plan_groups
from runner.workers.profile_worker import BlockCycler, Grid


def test_quick_profile_writes_a_usable_table(tmp_path, capsys):
    assert main(["profile", "--quick", "--no-mps", "--out-dir", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    table = tmp_path / "cpu__tiny.json"
    assert summary["profile"] == str(table) and summary["shares"] == [100]
    raw = json.loads((tmp_path / "cpu__tiny.points.json").read_text())
    points = raw["points"]
    grid = Grid.quick()
    assert len(points) == len(grid.prefill) + len(grid.decode) + len(grid.mixed) == summary["num_points"]
    assert {p["kind"] for p in points} == {"prefill", "decode", "mixed"}
    assert all(p["seconds"] > 0 and len(p["samples"]) >= grid.repeats for p in points)
    assert raw["train_points"] + raw["test_points"] == len(points) and raw["test_points"] > 0

    model = CostModel.load(table)
    meta = model.metadata
    assert model.profiled and meta["gpu"] == "cpu" and meta["model"] == "tiny" and meta["mps"] is False
    assert meta["shares"] == [100] and meta["jax_version"] and meta["quick"] is True
    held = meta["heldout"]
    assert held["n"] == raw["test_points"] and math.isfinite(held["median"])
    # CPU timings are noisy: check that predictions are sane, not that they are tight.
    preds = [model.predict_point(p) for p in points]
    assert all(math.isfinite(t) and t > 0 for t in preds)
    errors = sorted(abs(t - p["seconds"]) / p["seconds"] for t, p in zip(preds, points))
    assert errors[len(errors) // 2] < 0.5
    assert model.predict_decode(40, 8, 400) > 0 and model.predict_mixed(4, 100, [(64, 0)]) > 0


def test_plan_groups_pairs_complementary_shares():
    assert plan_groups((20, 30, 40, 50, 60, 70, 80, 100)) == [(100,), (20, 80), (30, 70), (40, 60), (50, 50)]
    # A share whose complement is not profiled still gets a partner process for its co-run measurements.
    assert plan_groups((25, 100)) == [(100,), (25, 75)]
    assert plan_groups((60,)) == [(60, 40)]


def test_block_cycler_hands_out_real_tables_and_wraps():
    cycler = BlockCycler(10, seed=0)
    a = cycler.table(50, 16, 6)            # 4 blocks, padded to the width
    assert len(a) == 6 and a[4:] == [0, 0] and len(set(a[:4])) == 4
    b = cycler.table(16 * 8, 16, 8)        # wraps around the 10-block pool
    assert set(a[:4]) | set(b) == set(range(10))
    with pytest.raises(ValueError, match="width"):
        cycler.table(200, 16, 6)


def test_grid_sizes_and_settings_validation():
    full = Grid.full()
    assert full.max_prefill_tokens() == 16384 and full.max_context() == 4096
    assert full.loop_prefill in full.prefill and full.loop_decode in full.decode   # compiled before the loops
    quick = Grid.quick()
    assert quick.loop_prefill in quick.prefill and quick.loop_decode in quick.decode
    for bad in ({"shares": (0, 50)}, {"shares": ()}, {"kv_gib": 0}, {"decode_steps": 0}):
        with pytest.raises(ValueError):
            ProfileSettings(**bad)


class FakeMps:
    """Stands in for runner.workers.mps.MpsControl on the CPU: the worker processes run uncapped."""

    def __init__(self):
        self.shares, self.stopped = [], False

    def client_env(self, sm_percent):
        self.shares.append(sm_percent)
        return {"NEXUS_TEST_SM_PERCENT": str(sm_percent)}

    def stop(self):
        self.stopped = True


def test_worker_processes_measure_solo_and_corun(tmp_path, monkeypatch):
    """The MPS path end to end on the CPU: a pair of worker processes (60 and its complement 40) measure alone,
    then each while the other loops; only share 60 is in the table."""
    import runner.workers.mps
    from nexus_jax.disagg.profile import run_profile

    fake = FakeMps()
    monkeypatch.setattr(runner.workers.mps, "try_start_mps", lambda: fake)
    # Two step shapes to compile per process: one prefill size over several prefixes, one decode batch.
    grid = Grid(prefill=tuple(((16, p),) for p in (0, 16, 32, 48, 64)), decode=((2, 8, 64), (2, 64, 256), (2, 8, 256)),
                corun_prefill=(((16, 0),),), corun_decode=((2, 8, 64),), mixed=(), loop_prefill=((16, 0),),
                loop_decode=(2, 8, 64), repeats=2)
    result = run_profile(ProfileSettings(model="tiny", shares=(60,), quick=True, out_dir=str(tmp_path), kv_gib=0.05,
                                         compile_cache=str(tmp_path / "xla-cache"), grid=grid))
    assert sorted(fake.shares) == [40, 60] and fake.stopped
    points = json.loads((tmp_path / "cpu__tiny.points.json").read_text())["points"]
    corun = [p for p in points if p["corun"]]
    assert {(p["kind"], p["share"], p["partner_share"]) for p in corun} == {("decode", 60, 40), ("prefill", 60, 40)}
    assert {p["share"] for p in points} == {60}
    model = CostModel.load(result["profile"])
    assert model.metadata["mps"] is True and model.shares == [60]
    assert set(model.decode_contention) == {60} and model.decode_contention[60] > 0
    # Resuming from the points file measures nothing again and gives the same table.
    again = run_profile(ProfileSettings(model="tiny", shares=(60,), quick=True, out_dir=str(tmp_path / "again"),
                                        resume=result["points"], grid=grid))
    assert sorted(fake.shares) == [40, 60] and again["num_points"] == len(points)
    assert CostModel.load(again["profile"]).decode == model.decode
    with pytest.raises(ValueError, match="model"):
        run_profile(ProfileSettings(model="llama-3.1-8b", quick=True, resume=result["points"]))


@pytest.mark.parametrize("decode_steps", [1, 2])
def test_warmup_compiles_every_program_the_measurements_run(decode_steps):
    """The grid's programs compile at once, on threads, before any timing: a shape the warm-up derived wrongly would
    compile inside a timed run (and its compilation would land in the warm-up sample, not in the table)."""
    from runner import programs
    from runner.workers.profile_worker import StepTimer

    def made():
        return sum(fn._cache_size() for fn in (programs.forward, programs.decode_steps, programs.sample_step))

    quick = Grid.quick()  # and decodes with contexts past the smallest block-table width (64 blocks)
    grid = dataclasses.replace(quick, decode=quick.decode + ((4, 1100, 1300),))
    timer = StepTimer("tiny", "auto", grid, kv_gib=0.05, decode_steps=decode_steps)
    before = made()
    timer.warmup()
    compiled = made()
    assert compiled > before
    for what in ("solo", "mixed", "corun_decode", "corun_prefill"):
        timer.measure(what, 100)
    assert made() == compiled
