"""The generated results file: figures read from each benchmark's JSON output, each with its device, date, command,
target and the prediction written before measuring (predictions.json), rendered as Markdown. run_all.py runs the
benchmarks and calls `section_figures` and `render`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

PREDICTIONS = Path(__file__).with_name("predictions.json")


@dataclasses.dataclass
class Measured:
    what: str
    value: float | None   # in `unit`; None for figures that are a whole run (serve)
    unit: str
    text: str
    roofline: str = ""    # the roofline or the comparison kernel, when there is one


def _kernel_figures(doc: dict[str, Any]) -> dict[str, Measured]:
    copy, peak = doc["hbm_copy_tbps"], doc["peak_bf16_tflops"]
    rows = {(r["kernel"], r["case"]): r for r in doc["rows"]}

    def find(kernel: str, case: str) -> dict[str, Any] | None:
        return next((r for (k, c), r in rows.items() if k == kernel and c.startswith(case)), None)

    ours_decode = find("pallas", "decode B=64 ctx=2048")
    specs = {  # id: (kernel, case prefix, what, unit)
        "decode_attention": ("pallas", "decode B=64 ctx=2048", "paged decode attention (Pallas)", "TB/s"),
        "prefill_attention": ("pallas", "prefill q=[8192] prefix=[0]", "paged prefill attention (Pallas), causal",
                              "TF/s"),
        "jax_paged_attention": ("jax paged_attention", "decode", "jax's paged_attention (Triton)", "TB/s"),
        "xla_reference_decode": ("xla reference", "decode", "XLA reference (gather + dense attention)", "TB/s"),
        "cudnn_dense_prefill": ("cudnn dot_product_attention", "dense", "cuDNN attention, contiguous KV", "TF/s"),
        "mgpu_dense_prefill": ("jax attention_mgpu", "dense", "jax attention_mgpu (fp16), contiguous KV", "TF/s"),
        "triton_dense_prefill": ("jax attention (triton mha)", "dense", "jax Triton mha, contiguous KV", "TF/s"),
        "write_kv_pallas": ("write_kv pallas", "T=8192", "write_kv (Pallas), per layer", "ms"),
        "write_kv_xla": ("write_kv xla", "T=8192", "write_kv as an XLA scatter, per layer", "ms"),
    }
    figures = {}
    for name, (kernel, case, what, unit) in specs.items():
        r = find(kernel, case)
        if r is None:
            continue
        value = r["ms"] if unit == "ms" else r["value"]
        roofline, text = "", f"{value:.4g} {unit} ({r['ms']:.4f} ms)"
        if unit == "ms":
            text = f"{value:.4f} ms"
            ours = find("write_kv pallas", case)
            if ours is not None and r is not ours:
                roofline = f"Pallas takes {ours['ms'] / value:.0%} of this time"
        elif unit == "TB/s":
            roofline = f"{value / copy:.0%} of the {copy:.2f} TB/s copy bandwidth"
            if ours_decode is not None and r is not ours_decode:
                roofline += f"; Pallas is {ours_decode['value'] / value:.2f}x this"
        elif unit == "TF/s":
            roofline = f"{value / peak:.0%} of {peak:.0f} TF/s"
        figures[name] = Measured(f"{what}, {r['case']}", value, unit, text, roofline)
    return figures


def _model_figures(doc: dict[str, Any]) -> dict[str, Measured]:
    d = doc["decode"]
    shape = f"batch {d['batch']} x context {d['ctx']}, {doc['preset']}"
    figures = {
        "hbm_copy": Measured("HBM copy bandwidth (read + write): the memory roofline", doc["hbm_copy_tbps"], "TB/s",
                             f"{doc['hbm_copy_tbps']:.2f} TB/s"),
        "decode_step": Measured(f"decode step, {shape} (device time of the jitted step)", d["device_ms"], "ms",
                                f"{d['device_ms']:.2f} ms", f"floor {d['floor_ms']:.2f} ms ({d['weights_gb']:.2f} GB "
                                f"weights + {d['kv_read_gb']:.2f} GB K/V): {d['floor_ms'] / d['device_ms']:.0%}"),
        "decode_step_host": Measured(f"decode step, {shape}, through ModelRunner.step (host work included)",
                                     d["host_ms"], "ms", f"{d['host_ms']:.2f} ms"),
    }
    if "prefill" in doc:
        p = doc["prefill"]
        figures["prefill"] = Measured(f"prefill, {p['tokens']} tokens in one sequence, {doc['preset']}",
                                      p["mfu"] * 100, "% MFU",
                                      f"{p['ms']:.1f} ms = {p['tflops']:.0f} TF/s = {p['mfu']:.0%} MFU",
                                      f"{doc['peak_bf16_tflops']:.0f} TF/s")
    if "logits_check" in doc:
        c = doc["logits_check"]
        figures["logits_check"] = Measured(f"model logits, Pallas kernels vs the XLA path, {c['preset']} {c['dtype']}",
                                           c["rel_err"], "relative error", f"{c['rel_err']:.1e}")
    return figures


def _throughput_figures(doc: dict[str, Any]) -> dict[str, Measured]:
    first, steady = doc["nexus"]["passes"][0], doc["nexus"]["passes"][-1]
    load = (f"{doc['num_prompts']} prompts x {doc['input_len']} tokens, {doc['output_len']} output tokens, "
            f"{doc['preset']}")
    figures = {
        "steady": Measured(f"LLM.generate output tok/s, steady state, {load}", steady["tok_s"], "tok/s",
                           f"{steady['tok_s']:.0f} tok/s ({steady['seconds']:.1f} s)"),
        "first_pass": Measured("same, first pass (XLA compilation included)", first["tok_s"], "tok/s",
                               f"{first['tok_s']:.0f} tok/s ({first['seconds']:.1f} s)"),
        "decode_over_floor": Measured("decode-only step time over its memory floor (steady pass)",
                                      steady["decode_time_over_floor"], "x",
                                      f"{steady['decode_time_over_floor']:.2f}x (median batch "
                                      f"{steady['decode_batch_median']:.0f}, {steady['decode_step_ms_median']:.1f} "
                                      f"ms per step)"),
    }
    hf = doc.get("hf") or {}
    if "tok_s" in hf:
        figures["transformers"] = Measured(f"transformers {hf['transformers']} generate, batch {hf['batch']}, same "
                                           f"GPU, same run", hf["tok_s"], "tok/s", f"{hf['tok_s']:.0f} tok/s")
        speedup = steady["tok_s"] / hf["tok_s"]
        figures["speedup"] = Measured("steady-state speed-up over transformers (same run)", speedup, "x",
                                      f"{speedup:.2f}x")
    return figures


def _serve_figures(docs: list[dict[str, Any]]) -> dict[str, Measured]:
    """One figure per bench serve run (label @ rate): the numbers RESULTS.md quotes, and the program metrics."""
    figures = {}
    for doc in docs:
        for run in doc["runs"]:
            s = run["summary"]
            t = lambda d, stat: _seconds(d[stat])  # noqa: E731
            text = (f"{s['completed']} done / {s['failed']} failed, {s['request_throughput']:.2f} req/s; TTFT "
                    f"mean {t(s['ttft'], 'mean')} / P99 {t(s['ttft'], 'p99')}; ITL median {t(s['itl'], 'median')}"
                    f" / P99 {t(s['itl'], 'p99')}; E2E mean {t(s['e2e'], 'mean')}")
            p = s.get("programs")
            if p is not None:
                text += (f"; {p['completed']} programs done / {p['failed']} failed, {p['program_throughput']:.3f} "
                         f"programs/s; program token latency mean {t(p['token_latency'], 'mean')} / P99 "
                         f"{t(p['token_latency'], 'p99')} per token")
            unit = "programs/s" if p is not None else "req/s"
            what = (f"{doc['label']} ({doc['dataset']['name']}, {doc['model']}), {run['phase']} at "
                    f"{run['request_rate']} {unit}")
            figures[f"{doc['label']} @ {run['request_rate']}"] = Measured(what, None, "run", text)
    return figures


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.1f} s"


READERS: dict[str, tuple[Callable[[Path], Any], Callable[[Any], dict[str, Measured]]]] = {
    "kernels": (lambda out: _load(out / "kernels.json"), _kernel_figures),
    "model": (lambda out: _load(out / "model.json"), _model_figures),
    "throughput": (lambda out: _load(out / "throughput.json"), _throughput_figures),
    "serve": (lambda out: [_load(p) for p in sorted(out.glob("*.json"))], _serve_figures),
}


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"the benchmark wrote no {path}")
    return json.loads(path.read_text())


def section_figures(kind: str, out: Path, predictions: dict[str, Any], section: str,
                    meta: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
    """(figures, the benchmark's own tables, what its output says about the run) of one section's output dir."""
    read, extract = READERS[kind]
    loaded = read(out)
    docs = loaded if isinstance(loaded, list) else [loaded]
    own = predictions.get(section, {})
    figures = []
    for name, m in extract(loaded).items():
        key = name.split(" @ ")[0]  # a serve run's prediction is its label's
        spec = own.get(key, {"unit": m.unit, "target": None, "prediction": None})
        if spec["unit"] != m.unit:
            raise ValueError(f"predictions.json: {section}.{key} is in {spec['unit']!r} but run_all measures it in "
                             f"{m.unit!r}")
        figures.append({"id": name, **dataclasses.asdict(m), "target": spec["target"],
                        "prediction": spec["prediction"], **meta})
    tables = [d.get("table") or _serve_table(d) for d in docs]
    return figures, tables, _device(kind, docs)


def _serve_table(doc: dict[str, Any]) -> str:
    from nexus_jax.benchmark.report import markdown_table
    return markdown_table([doc])


def _device(kind: str, docs: list[dict[str, Any]]) -> dict[str, Any]:
    if not docs:
        return {}
    d = docs[0]
    if kind == "serve":
        return {"device": d["backend"].get("device"), "jax": d["backend"].get("jax")}
    if kind == "throughput":
        return {"device": d["nexus"]["device"], "jax": d["nexus"]["jax"]}
    return {"device": d["device"], "jax": d["jax"]}


def load_predictions(path: Path = PREDICTIONS) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    for section, figures in doc.items():
        if section == "about":
            continue
        for name, spec in figures.items():
            target = spec.get("target")
            if target is not None and target.get("op") not in (">=", "<="):
                raise ValueError(f"{path}: {section}.{name}: a target's op must be >= or <=, got {target}")
            if "unit" not in spec:
                raise ValueError(f"{path}: {section}.{name} has no unit")
    return doc


def verdict(value: float | None, target: dict[str, Any] | None, quick: bool) -> str:
    if target is None or value is None:
        return "-"
    if quick:
        return "n/a (quick sizes)"
    met = value >= target["value"] if target["op"] == ">=" else value <= target["value"]
    return "**yes**" if met else "**no**"


def against_prediction(value: float | None, prediction: dict[str, Any] | None, quick: bool) -> str:
    if prediction is None or value is None or "low" not in prediction:
        return "-"
    if quick:
        return "n/a (quick sizes)"
    if value < prediction["low"]:
        return "no: below"
    return "no: above" if value > prediction["high"] else "yes"


def render(results: dict[str, Any]) -> str:
    """RESULTS.generated.md: per section its commands, device, date and status, a table of its figures (target,
    whether it is met, the prediction and whether the figure fell inside it), then the benchmark's own tables."""
    lines = ["# Results (generated)", "", f"Generated by `{results['command']}` ({results['generated']}). Targets and "
             "predictions come from `benchmarks/predictions.json`, written before measuring.", ""]
    for s in results["sections"].values():
        quick = s["quick"]
        commands = "; ".join(f"`{c}`" for c in s["commands"])
        lines += [f"## {s['title']}{', quick mode: tiny sizes, not results' if quick else ''}", "",
                  f"Command{'s' if len(s['commands']) > 1 else ''}: {commands}.", "",
                  f"Device: {s.get('device') or 'unknown'}; jax {s.get('jax') or '?'}; date {s['date']}; "
                  f"{s['seconds']:.0f} s; {s['status']}.", ""]
        if s["figures"]:
            lines += ["| figure | measured | target | met | prediction (written before measuring) | in prediction | "
                      "roofline / comparison |", "|---|---|---|---|---|---|---|"]
            for f in s["figures"]:
                target = "-" if f["target"] is None else f"{f['target']['op']} {f['target']['value']} {f['unit']}"
                p = f["prediction"]
                predicted = "none written" if p is None else f"{p['text']} ({p.get('written', 'undated')})"
                lines.append(f"| {f['what']} | **{f['text']}** | {target} | {verdict(f['value'], f['target'], quick)} "
                             f"| {predicted} | {against_prediction(f['value'], p, quick)} | {f['roofline'] or '-'} |")
            lines.append("")
        if s.get("log_tail"):
            lines += ["Last lines of its log:", "", "```", s["log_tail"], "```", ""]
        for table in s["tables"]:
            lines += ["Full output of the run:", "", table, ""]
    return "\n".join(lines)
