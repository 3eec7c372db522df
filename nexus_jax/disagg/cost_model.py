"""Step latency per SM share: the table the partition controller optimises over.

Per measured share s (percent of the SMs a process may use under MPS):
  decode step  = a(s) * sum_kv + b(s) * batch + c(s)                       (sum_kv: context tokens of the batch)
  prefill step = a(s) * sum n^2 + b(s) * sum n * prefix + c(s) * sum n + d(s)   (over the step's chunks)
times a contention multiplier per share when the other phase co-runs in the complementary share (HBM bandwidth
is not partitioned). Shares between measured ones interpolate the coefficients linearly (clamped outside), which
is the same as interpolating the predictions. A mixed (aggregated) step on all SMs is composed, not fitted
separately: both forms' variable parts at share 100 plus one constant, fitted from mixed measurements when there
are any (the two phases read the weights once together, so the constants must not be added).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from configs import PROFILES_DIR

if TYPE_CHECKING:
    from runner.model.config import ModelConfig

FORMAT = "nexus-jax-cost-model/1"
KINDS = ("decode", "prefill", "mixed")
# HBM bandwidth kept at an SM share, from DESIGN.md §2's decode GEMM chain on an H100 (2443 GB/s at 100%).
_BW_CURVE = ((0, 0.0), (12, 1007 / 2443), (25, 2026 / 2443), (50, 2240 / 2443), (100, 1.0))
# Co-run slowdowns from the same measurements: decode at 40% went 3.50 (interpolated) -> 5.17 ms beside a 60%
# prefill; prefill at 60% went ~7.47 (8.96 ms at 50%, linear) -> 10.12 ms beside it.
_ANALYTIC_DECODE_CONTENTION = 5.17 / 3.50
_ANALYTIC_PREFILL_CONTENTION = 10.12 / 7.47


def decode_features(batch: int, sum_kv: int) -> np.ndarray:
    return np.array([sum_kv, batch, 1.0])


def prefill_features(chunks: Sequence[Sequence[int]]) -> np.ndarray:
    n = np.array([c[0] for c in chunks], float)
    prefix = np.array([c[1] for c in chunks], float)
    if np.any(n <= 0) or np.any(prefix < 0):
        raise ValueError(f"prefill chunks need new_tokens > 0 and prefix_len >= 0, got {list(chunks)}")
    return np.array([np.sum(n * n), np.sum(n * prefix), np.sum(n), 1.0])


def profile_path(gpu_name: str, model_name: str, root: str | Path = PROFILES_DIR) -> Path:
    """Where a profile lives, e.g. configs/profiles/nvidia-h100-80gb-hbm3__llama-3.1-8b.json."""
    return Path(root) / f"{slug(gpu_name)}__{slug(Path(model_name).name)}.json"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def _interp(table: dict[int, Any], share: float) -> np.ndarray:
    shares = sorted(table)
    values = np.array([np.atleast_1d(table[s]) for s in shares], float)
    return np.array([np.interp(share, shares, values[:, k]) for k in range(values.shape[1])])


def _check_share(share: float) -> None:
    if not 0 < share <= 100:
        raise ValueError(f"SM share must be in (0, 100] percent, got {share}")


def _fit_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimising the squared *relative* error (latencies span 1000x, and the goal is
    a relative one); columns are rescaled first so that n^2 and the constant are solved on equal footing."""
    from scipy.optimize import nnls  # imported here: the engine imports this module, scipy is slow to load

    a = x / y[:, None]
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(a / scale, np.ones(len(y)))
    return coef / scale


@dataclasses.dataclass
class CostModel:
    decode: dict[int, tuple[float, ...]]                 # share -> (a, b, c)
    prefill: dict[int, tuple[float, ...]]                # share -> (a, b, c, d)
    decode_contention: dict[int, float] = dataclasses.field(default_factory=dict)
    prefill_contention: dict[int, float] = dataclasses.field(default_factory=dict)
    mixed_constant: float | None = None                  # None: max of the decode and prefill constants at 100
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, table, width in (("decode", self.decode, 3), ("prefill", self.prefill, 4),
                                   ("decode_contention", self.decode_contention, 1),
                                   ("prefill_contention", self.prefill_contention, 1)):
            if name in ("decode", "prefill") and not table:
                raise ValueError(f"cost model has no {name} coefficients")
            for share, coef in table.items():
                _check_share(share)
                if np.atleast_1d(coef).shape != (width,) or not np.all(np.isfinite(coef)) or np.any(
                        np.asarray(coef) < 0):
                    raise ValueError(f"{name}[{share}] must be {width} finite non-negative numbers, got {coef}")

    @property
    def profiled(self) -> bool:
        return self.metadata.get("source") == "profiled"

    @property
    def shares(self) -> list[int]:
        return sorted(set(self.decode) | set(self.prefill))

    # ---- prediction ----
    def predict_decode(self, share: float, batch: int, sum_kv: int, corun: bool = False) -> float:
        _check_share(share)
        if batch < 0 or sum_kv < 0:
            raise ValueError(f"batch and sum_kv must be >= 0, got {batch} and {sum_kv}")
        if batch == 0:
            return 0.0
        t = float(_interp(self.decode, share) @ decode_features(batch, sum_kv))
        return t * self._contention(self.decode_contention, share) if corun else t

    def predict_prefill(self, share: float, chunks: Sequence[tuple[int, int]], corun: bool = False) -> float:
        _check_share(share)
        if not chunks:
            return 0.0
        t = float(_interp(self.prefill, share) @ prefill_features(chunks))
        return t * self._contention(self.prefill_contention, share) if corun else t

    def predict_mixed(self, decode_batch: int, sum_kv: int, chunks: Sequence[tuple[int, int]]) -> float:
        """One aggregated step of decodes and prefill chunks on all SMs."""
        if not chunks:
            return self.predict_decode(100, decode_batch, sum_kv)
        if decode_batch == 0:
            return self.predict_prefill(100, chunks)
        if decode_batch < 0 or sum_kv < 0:
            raise ValueError(f"decode_batch and sum_kv must be >= 0, got {decode_batch} and {sum_kv}")
        return self._mixed_variable(decode_batch, sum_kv, chunks) + self._mixed_constant()

    def predict_point(self, p: dict[str, Any]) -> float:
        kind = p["kind"]
        if kind == "decode":
            return self.predict_decode(p["share"], p["batch"], p["sum_kv"], p.get("corun", False))
        if kind == "prefill":
            return self.predict_prefill(p["share"], p["chunks"], p.get("corun", False))
        if kind == "mixed":
            return self.predict_mixed(p["batch"], p["sum_kv"], p["chunks"])
        raise ValueError(f"unknown point kind {kind!r}; expected one of {KINDS}")

    def _mixed_variable(self, batch: int, sum_kv: int, chunks: Sequence[tuple[int, int]]) -> float:
        d, p = _interp(self.decode, 100), _interp(self.prefill, 100)
        return float(d[:2] @ decode_features(batch, sum_kv)[:2] + p[:3] @ prefill_features(chunks)[:3])

    def _mixed_constant(self) -> float:
        if self.mixed_constant is not None:
            return self.mixed_constant
        return float(max(_interp(self.decode, 100)[2], _interp(self.prefill, 100)[3]))

    @staticmethod
    def _contention(table: dict[int, float], share: float) -> float:
        return float(_interp(table, share)[0]) if table else 1.0

    # ---- fitting and evaluation ----
    @classmethod
    def fit(cls, points: Sequence[dict[str, Any]], metadata: dict[str, Any] | None = None) -> "CostModel":
        """Fits every share's coefficients from solo points, then the contention multipliers (median ratio of
        co-run measurements to the solo prediction) and the mixed constant (median residual, >= 0)."""
        for p in points:
            _check_point(p)
        tables: dict[str, dict[int, tuple[float, ...]]] = {"decode": {}, "prefill": {}}
        for kind, width in (("decode", 3), ("prefill", 4)):
            solo = [p for p in points if p["kind"] == kind and not p.get("corun")]
            if not solo:
                raise ValueError(f"no solo {kind} points to fit")
            for share in sorted({p["share"] for p in solo}):
                group = [p for p in solo if p["share"] == share]
                if len(group) < width:
                    raise ValueError(f"{len(group)} solo {kind} points at share {share}; at least {width} needed")
                x = np.array([_features(p) for p in group])
                y = np.array([p["seconds"] for p in group])
                tables[kind][share] = tuple(float(v) for v in _fit_relative(x, y))
        model = cls(tables["decode"], tables["prefill"])
        for kind, table in (("decode", model.decode_contention), ("prefill", model.prefill_contention)):
            corun = [p for p in points if p["kind"] == kind and p.get("corun")]
            for share in sorted({p["share"] for p in corun}):
                ratios = [p["seconds"] / model.predict_point({**p, "corun": False}) for p in corun
                          if p["share"] == share]
                table[share] = float(np.median(ratios))
        mixed = [p for p in points if p["kind"] == "mixed"]
        if mixed:
            residuals = [p["seconds"] - model._mixed_variable(p["batch"], p["sum_kv"], p["chunks"]) for p in mixed]
            model.mixed_constant = max(0.0, float(np.median(residuals)))
        model.metadata = {"source": "profiled", "date": datetime.date.today().isoformat(),
                          "shares": model.shares, "num_points": len(points), **(metadata or {})}
        return model

    def evaluate(self, points: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Relative error |predicted - measured| / measured: overall and per kind."""
        def summary(ps: list[dict[str, Any]]) -> dict[str, float]:
            err = np.array([abs(self.predict_point(p) - p["seconds"]) / p["seconds"] for p in ps])
            return {"n": len(ps), "median": float(np.median(err)), "p90": float(np.percentile(err, 90)),
                    "max": float(err.max())}
        if not points:
            raise ValueError("no points to evaluate")
        out = summary(list(points))
        out["by_kind"] = {k: summary([p for p in points if p["kind"] == k])
                          for k in KINDS if any(p["kind"] == k for p in points)}
        return out

    # ---- persistence ----
    def to_json(self) -> dict[str, Any]:
        def table(t: dict[int, Any]) -> dict[str, Any]:
            return {str(s): (list(v) if isinstance(v, tuple) else v) for s, v in sorted(t.items())}
        return {"format": FORMAT, "metadata": self.metadata, "decode": table(self.decode),
                "prefill": table(self.prefill), "decode_contention": table(self.decode_contention),
                "prefill_contention": table(self.prefill_contention), "mixed_constant": self.mixed_constant}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no cost model at {path}")
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file (format {doc.get('format')!r})")
        def table(t: dict[str, Any]) -> dict[int, Any]:
            return {int(s): (tuple(v) if isinstance(v, list) else float(v)) for s, v in t.items()}
        return cls(table(doc["decode"]), table(doc["prefill"]), table(doc["decode_contention"]),
                   table(doc["prefill_contention"]), doc["mixed_constant"], doc["metadata"])

    # ---- default without a profile ----
    @classmethod
    def analytic(cls, model_config: "ModelConfig", peak_flops: float, hbm_bw: float,
                 shares: Sequence[int] = (20, 30, 40, 50, 60, 70, 80, 100), dtype_bytes: int = 2) -> "CostModel":
        """UNPROFILED roofline estimate, for when no profile exists. Each step costs max(FLOPs / compute,
        bytes / bandwidth), with FLOPs and bytes counted from the config, compute scaling linearly with the share
        and bandwidth following DESIGN.md §2's H100 curve (nearly flat down to a quarter of the SMs); the linear
        forms are then fitted to that roofline over typical steps, like a profile is fitted to measurements."""
        if peak_flops <= 0 or hbm_bw <= 0:
            raise ValueError(f"peak_flops and hbm_bw must be positive, got {peak_flops} and {hbm_bw}")
        c = model_config
        lm_head = c.hidden_size * c.vocab_size
        dense = c.num_params() - lm_head * (1 if c.tie_word_embeddings else 2)   # per-token GEMM weights
        weight_bytes = (dense + lm_head) * dtype_bytes                           # read once per step
        kv_bytes = 2 * c.num_layers * c.kv_size * dtype_bytes                    # per token
        attn = 4 * c.q_size * c.num_layers                                       # QK^T and PV flops per pair
        points = []
        for s in shares:
            _check_share(s)
            flops, bw = peak_flops * s / 100, hbm_bw * np.interp(s, *zip(*_BW_CURVE))
            for batch in (1, 8, 32, 64, 128, 256):
                for ctx in (256, 1024, 4096):
                    kv = batch * ctx
                    t = max((2 * (dense + lm_head) * batch + attn * kv) / flops, (weight_bytes + kv_bytes * kv) / bw)
                    points.append({"kind": "decode", "share": s, "batch": batch, "sum_kv": kv, "seconds": t})
            for n in (128, 512, 2048, 8192):
                for prefix in (0, 2048, 8192):
                    comp = 2 * dense * n + 2 * lm_head + attn * (n * n / 2 + n * prefix)
                    t = max(comp / flops, (weight_bytes + kv_bytes * (prefix + n)) / bw)
                    points.append({"kind": "prefill", "share": s, "chunks": [(n, prefix)], "seconds": t})
        model = cls.fit(points)
        model.decode_contention = {s: _ANALYTIC_DECODE_CONTENTION for s in shares}
        model.prefill_contention = {s: _ANALYTIC_PREFILL_CONTENTION for s in shares}
        model.metadata = {"source": "analytic (unprofiled roofline)", "peak_flops": peak_flops, "hbm_bw": hbm_bw,
                          "shares": sorted(shares), "date": datetime.date.today().isoformat()}
        return model


def _features(p: dict[str, Any]) -> np.ndarray:
    return decode_features(p["batch"], p["sum_kv"]) if p["kind"] == "decode" else prefill_features(p["chunks"])


def _check_point(p: dict[str, Any]) -> None:
    if p.get("kind") not in KINDS:
        raise ValueError(f"point kind must be one of {KINDS}, got {p.get('kind')!r} in {p}")
    _check_share(p.get("share", 0))
    if not (isinstance(p.get("seconds"), (int, float)) and np.isfinite(p["seconds"]) and p["seconds"] > 0):
        raise ValueError(f"point needs a finite positive 'seconds', got {p}")


def split_points(points: Sequence[dict[str, Any]], holdout: float = 0.2,
                 seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test): about `holdout` of each (kind, share, corun) group is held out, keeping enough training
    points in every group for its fit (4 prefill, 3 decode, 1 co-run or mixed)."""
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    rng = np.random.default_rng(seed)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["kind"], p["share"], bool(p.get("corun"))), []).append(p)
    train, test = [], []
    for (kind, _, corun), group in groups.items():
        keep = 1 if corun or kind == "mixed" else (4 if kind == "prefill" else 3)
        n_test = max(0, min(round(len(group) * holdout), len(group) - keep))
        order = rng.permutation(len(group))
        test += [group[i] for i in order[:n_test]]
        train += [group[i] for i in order[n_test:]]
    return train, test
