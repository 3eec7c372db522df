"""bench_structured's --quick mode runs end to end on CPU (the GPU numbers come from the full run)."""

from benchmarks import bench_structured


def test_quick_mode_measures_every_row():
    args = bench_structured.parse(["--quick"])
    results = bench_structured.run(args)
    assert results["plain"]["tokens"] == 4 * 8 and results["json_schema"]["tokens"] > 0
    assert results["ttft_inprocess_ms"] > 0 and results["ttft_http_ms"] > 0
    text = bench_structured.table(args, results)
    assert "structured / plain ITL" in text and "HTTP adds" in text
