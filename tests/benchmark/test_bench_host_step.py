"""benchmarks/bench_host_step.py --engine: the engine step it times is steady decode, and the mock's share is apart."""

from benchmarks import bench_host_step


def test_engine_step_times_steady_decode_and_splits_out_the_mock():
    total, mock, host = bench_host_step.engine_step(batch=8, context=64, steps=5)
    assert 0 < mock < total and 0 < host < total  # medians of per-step parts: never above the step's median
