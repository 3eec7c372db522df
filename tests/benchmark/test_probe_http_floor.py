"""The HTTP floor probe times every server in both loads, with its client in another process."""

import json

from benchmarks import probe_http_floor


def test_every_server_is_timed_at_light_load_and_back_to_back(tmp_path):
    out = tmp_path / "floor.json"
    results = probe_http_floor.main(["--requests", "5", "--json", str(out)])
    assert set(results) == set(probe_http_floor.SERVERS)
    for row in results.values():
        assert set(row) == {"light load (20 ms apart)", "back to back"}
        for timing in row.values():
            assert 0 < timing["median_ms"] <= timing["p90_ms"] < 1000
    assert json.loads(out.read_text())["servers"] == results
