"""bench_structured's --quick mode runs end to end on CPU (the GPU numbers come from the full run)."""

from benchmarks import bench_structured


def test_quick_mode_measures_every_row(tmp_path):
    args = bench_structured.parse(["--quick", "--trace", str(tmp_path)])
    results = bench_structured.run(args)
    assert results["plain"]["tokens"] == 4 * 8 and results["json_schema"]["tokens"] > 0
    assert len(results["ratios"]) == 2 and all(x > 0 for x in results["ratios"])
    assert results["ttft_inprocess_ms"] > 0 and results["ttft_http_ms"] > 0 and results["ttft_http_bare_ms"] > 0
    assert results["ttft_http_process_ms"] > 0  # the bare reader in a process of its own
    assert set(results["http_floor_ms"]) == {"fastapi", "asgi"} and min(results["http_floor_ms"].values()) > 0
    for case in ("plain", "json_schema"):  # the profiled window timed the loop's parts (no GPU events on CPU)
        host = results["profile"][case]["host_ms_per_step"]
        assert host["step"] > 0 and host["dispatch"] > 0
    assert results["profile"]["json_schema"]["host_calls"]["masks"] > 0  # the grammar rows asked for masks
    assert results["profile"]["plain"]["host_calls"].get("_late_limits", 0) == 0
    text = bench_structured.table(args, results)
    assert "structured / plain ITL" in text and "HTTP adds" in text and "decode window" in text
