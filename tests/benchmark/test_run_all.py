"""benchmarks/run_all.py: a real quick run on CPU (serve and model sections), figures with targets and
predictions from hand-made benchmark outputs, failures, timeouts, merging, and predictions.json's consistency."""

import json

import pytest

from benchmarks import results_file, run_all
from nexus_jax.benchmark import report
from nexus_jax.benchmark.programs_driver import ProgramRecord, ProgramRunResult
from nexus_jax.benchmark.serve import RequestRecord

KERNEL_ROWS = [("pallas", "decode B=64 ctx=2048", 0.192, "TB/s", 2.8),
               ("pallas", "prefill q=[8192] prefix=[0]", 1.27, "TF/s", 432.0),
               ("jax paged_attention", "decode B=64 ctx=2048", 0.3, "TB/s", 1.8),
               ("xla reference", "decode B=64 ctx=2048", 0.9, "TB/s", 0.6),
               ("cudnn dot_product_attention", "dense causal S=8192", 0.96, "TF/s", 572.0),
               ("jax attention_mgpu", "dense causal S=8192", 1.1, "TF/s", 500.0),
               ("jax attention (triton mha)", "dense causal S=8192", 2.0, "TF/s", 275.0),
               ("write_kv pallas", "T=8192", 0.026, "GB/s", 5000.0), ("write_kv xla", "T=8192", 0.16, "GB/s", 800.0)]
DOCS = {
    "kernels": {"device": "NVIDIA H100 80GB HBM3", "jax": "0.11.2", "date": "2026-11-22 10:00:00",
                "hbm_copy_tbps": 2.94, "peak_bf16_tflops": 989.0, "table": "| kernel | own table |",
                "rows": [dict(kernel=k, case=c, ms=ms, metric=m, value=v, target="", note="")
                         for k, c, ms, m, v in KERNEL_ROWS]},
    "model": {"device": "NVIDIA H100 80GB HBM3", "jax": "0.11.2", "date": "2026-11-22", "preset": "llama-3.1-8b",
              "hbm_copy_tbps": 2.94, "peak_bf16_tflops": 989.0, "table": "model table",
              "decode": {"batch": 64, "ctx": 2048, "device_ms": 13.87, "host_ms": 17.76, "floor_ms": 11.30,
                         "weights_gb": 16.06, "kv_read_gb": 17.18},
              "prefill": {"tokens": 8192, "ms": 231.0, "tflops": 608.0, "mfu": 0.62},
              "logits_check": {"preset": "llama-3.2-1b", "dtype": "float32", "rel_err": 2.1e-3}},
    "throughput": {"date": "2026-11-22", "command": "x", "preset": "llama-3.1-8b", "num_prompts": 1000,
                   "input_len": 512, "output_len": 256, "table": "throughput table",
                   "hf": {"batch": 128, "tok_s": 1435.0, "transformers": "5.17"},
                   "nexus": {"device": "NVIDIA H100 80GB HBM3", "jax": "0.11.2", "passes": [
                       {"tok_s": 1599.0, "seconds": 160.0, "decode_time_over_floor": 3.0, "decode_batch_median": 256,
                        "decode_step_ms_median": 40.0},
                       {"tok_s": 8231.0, "seconds": 31.1, "decode_time_over_floor": 1.29,
                        "decode_batch_median": 256, "decode_step_ms_median": 16.1}]}},
}
FILES = {"kernels": "kernels.json", "model": "model.json", "throughput": "throughput.json"}


def writer(path: str, doc) -> list[str]:
    """A section command that only writes a benchmark's JSON output (no GPU needed)."""
    return ["-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", path, json.dumps(doc)]


@pytest.fixture
def fake_sections(monkeypatch):
    for name, doc in DOCS.items():
        title, kind, _, _ = run_all.SECTIONS[name]
        command = writer("{out}/" + FILES[name], doc)
        monkeypatch.setitem(run_all.SECTIONS, name, (title, kind, [command], [command]))


def row(md: str, start: str) -> str:
    (line,) = [ln for ln in md.splitlines() if ln.startswith(start)]
    return line


def test_figures_carry_targets_predictions_and_rooflines(tmp_path, fake_sections):
    assert run_all.main(["--only", "kernels,model,throughput", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "RESULTS.generated.md").read_text()
    assert row(md, "| paged decode attention (Pallas), decode B=64 ctx=2048 |") == (
        "| paged decode attention (Pallas), decode B=64 ctx=2048 | **2.8 TB/s (0.1920 ms)** | >= 2.4 TB/s | **yes** | "
        "2.2-2.6 TB/s (2026-11-22) | no: above | 95% of the 2.94 TB/s copy bandwidth |")
    assert "| **432 TF/s (1.2700 ms)** | >= 350 TF/s | **yes** | 250-350 TF/s (2026-11-22) | no: above | 44% of 989" \
        in row(md, "| paged prefill attention")
    assert "Pallas is 1.56x this" in row(md, "| jax's paged_attention")
    decode = row(md, "| decode step, batch 64 x context 2048, llama-3.1-8b (device")
    assert "| <= 13 ms | **no** | about 12.5 ms (2026-11-22) | - | floor 11.30 ms" in decode
    assert "| >= 60 % MFU | **yes** | 55-65% MFU (2026-11-22) | yes |" in row(md, "| prefill, 8192 tokens")
    assert "**5.74x** | >= 5 x | **yes** | about 4x" in row(md, "| steady-state speed-up")
    assert "**1.29x" in row(md, "| decode-only step time") and "<= 1.4 x | **yes**" in md
    assert md.count("Device: NVIDIA H100 80GB HBM3; jax 0.11.2; date ") == 3
    assert "Command: `PYTHONPATH=. python3 -c" in md and "| kernel | own table |" in md
    doc = json.loads((tmp_path / "results.json").read_text())
    figure = doc["sections"]["kernels"]["figures"][0]
    assert figure["device"] == "NVIDIA H100 80GB HBM3" and figure["date"] and figure["commands"]
    assert figure["target"] == {"op": ">=", "value": 2.4} and figure["prediction"]["low"] == 2.2


def test_predictions_file_names_exactly_the_figures_measured(tmp_path):
    predictions = results_file.load_predictions()
    for name, doc in DOCS.items():
        (tmp_path / FILES[name]).write_text(json.dumps(doc))
        figures, _, _ = results_file.section_figures(name, tmp_path, predictions, name, {})
        assert {f["id"] for f in figures} == set(predictions[name])
    for name, (_, kind, full, _) in run_all.SECTIONS.items():
        if kind == "serve":  # a serve figure's prediction is its label's
            labels = {a[a.index("--label") + 1] for a in full}
            assert labels == set(predictions[name])
    bad = {"model": {"decode_step": {"unit": "s", "target": None, "prediction": None}}}
    with pytest.raises(ValueError, match="model.decode_step is in 's'"):
        results_file.section_figures("model", tmp_path, bad, "model", {})


def test_a_failing_or_hanging_benchmark_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, fake_sections):
    fail = ["-c", "import sys; print('boom from the benchmark'); sys.exit(3)"]
    hang = ["-c", "import time; print('waiting', flush=True); time.sleep(60)"]
    monkeypatch.setitem(run_all.SECTIONS, "serve", ("Serving", "serve", [fail], [fail]))
    monkeypatch.setitem(run_all.SECTIONS, "kernels", ("Kernels", "kernels", [hang], [hang]))
    assert run_all.main(["--only", "serve,kernels,model", "--out", str(tmp_path), "--timeout-s", "2"]) == 1
    doc = json.loads((tmp_path / "results.json").read_text())
    serve, kernels, model = (doc["sections"][n] for n in ("serve", "kernels", "model"))
    assert "exited with status 3" in serve["status"] and "boom from the benchmark" in serve["log_tail"]
    assert "exited with status -9" in kernels["status"] and kernels["seconds"] < 30 and not kernels["figures"]
    assert model["status"] == "completed" and model["figures"]
    md = (tmp_path / "RESULTS.generated.md").read_text()
    assert "boom from the benchmark" in md and "| decode step, batch 64" in md
    with pytest.raises(SystemExit, match="unknown section"):
        run_all.main(["--only", "nope", "--out", str(tmp_path)])


def test_program_runs_render_their_program_metrics(tmp_path):
    records = [RequestRecord(10, 2, 0.0, [0.1, 0.2], 0.2, True), RequestRecord(10, 2, 0.3, [0.5, 0.6], 0.6, True)]
    run = ProgramRunResult(0.5, 1.0, None, 1.0, records, [ProgramRecord("react-0", "react", 0.0, 0.6, 2, [0, 1], 4,
                                                                        True)])
    doc = {"label": "programs-plas", "model": "m", "dataset": {"name": "programs-mix"}, "backend": {"device": "d"},
           "runs": [{"phase": "sweep", **report.run_to_json(run, report.summarize(run))}]}
    (tmp_path / "programs-plas.json").write_text(json.dumps(doc))
    figures, tables, device = results_file.section_figures("serve", tmp_path, results_file.load_predictions(),
                                                           "programs-plas", {})
    (figure,) = figures
    assert figure["id"] == "programs-plas @ 0.5" and figure["prediction"] is None and device["device"] == "d"
    assert "1 programs done / 0 failed, 1.000 programs/s; program token latency mean 150.0 ms" in figure["text"]
    assert "programs/s" in tables[0]


def test_quick_run_on_cpu_then_merge(tmp_path):
    quick = tmp_path / "quick"
    assert run_all.main(["--quick", "--only", "serve,model", "--out", str(quick)]) == 0
    md = (quick / "RESULTS.generated.md").read_text()
    assert "## Serving benchmark, quick mode" in md and "## Full model steps, quick mode" in md
    assert "| quick (random, embedded tiny model), sweep at inf req/s | **4 done / 0 failed" in md
    assert "| decode step, batch 2 x context 64, tiny (device time of the jitted step) |" in md
    assert "| <= 13 ms | n/a (quick sizes) | about 12.5 ms (2026-11-22) |" in md
    assert "Command: `nexus-jax bench serve --dataset random" in md and "--out-dir $OUT/serve`" in md
    assert md.count("Device: cpu") == 2 and "completed." in md
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text(json.dumps({"sections": {"kernels": {
        **json.loads((quick / "results.json").read_text())["sections"]["model"], "title": "Kernels from elsewhere"}}}))
    merged = tmp_path / "merged"
    assert run_all.main(["--merge", str(quick), str(other / "results.json"), "--out", str(merged)]) == 0
    out = (merged / "RESULTS.generated.md").read_text()
    assert "## Kernels from elsewhere" in out and "## Serving benchmark" in out
    assert list(json.loads((merged / "results.json").read_text())["sections"]) == ["serve", "model", "kernels"]
    with pytest.raises(FileNotFoundError):
        run_all.main(["--merge", str(tmp_path / "missing"), "--out", str(merged)])


def test_kernel_cases_that_all_fail_fail_the_run(tmp_path, monkeypatch):
    # On CPU every Pallas case raises; the run must say so by its exit status, not only in its log.
    from benchmarks import bench_kernels

    def no_gpu(*args, **kwargs):
        raise ValueError("Only interpret mode is supported on CPU backend.")
    for case in ("check_correctness", "bench_decode", "bench_prefill", "bench_decode_baselines",
                 "bench_dense_baselines", "bench_write"):
        monkeypatch.setattr(bench_kernels, case, no_gpu)
    for name in ("ROWS", "LOG", "FAILED", "SKIPPED"):
        monkeypatch.setattr(bench_kernels, name, [])
    out = tmp_path / "kernels"
    assert bench_kernels.main(["--out", str(out), "--copy-mb", "1", "--json", str(out / "kernels.json")]) == 1
    doc = json.loads((out / "kernels.json").read_text())
    assert doc["rows"] == [] and len(doc["failed"]) == 22
    assert doc["failed"][1] == "decode main: ValueError: Only interpret mode is supported on CPU backend."


def test_a_benchmark_that_exits_0_with_no_measurement_fails_its_section(tmp_path, monkeypatch, fake_sections):
    empty = writer("{out}/kernels.json", {**DOCS["kernels"], "rows": []})
    monkeypatch.setitem(run_all.SECTIONS, "kernels", ("Kernels", "kernels", [empty], [empty]))
    assert run_all.main(["--only", "kernels,model", "--out", str(tmp_path)]) == 1
    doc = json.loads((tmp_path / "results.json").read_text())
    assert "no measurement" in doc["sections"]["kernels"]["status"]
    assert doc["sections"]["model"]["status"] == "completed"
