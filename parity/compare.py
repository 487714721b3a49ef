"""Stage-by-stage comparison of two runs, and the tolerance policy's numbers (numpy only).

For each stage: max abs error, max relative error max|a-b| / max|ref|, relative Frobenius error
||a-b|| / ||ref||, cosine similarity, and pass/fail against that stage's bound on the max
relative error. The first failing stage, in data-flow order, is where the runs diverge.

The tolerance policy (explained in ms_rm_parity.harness, which measures the bounds): a stage's
bound is max(FP32_BOUND, FACTOR[dtype] x the reference's own dtype noise at that stage). Tests
take their tolerances from here, never from what one machine printed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional

import numpy as np

FP32_BOUND = 1e-5                                   # floor of every bound on the max relative error
FACTOR = {"fp32": 5.0, "bf16": 2.0, "fp16": 2.0}     # x the reference's own noise at that precision


def max_rel_error(ours, ref) -> float:
    """max|ours - ref| / max|ref|, in float64 (the policy's measure)."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shapes differ: {ours.shape} vs {ref.shape}")
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    diff = float(np.abs(ours - ref).max()) if ref.size else 0.0
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def policy_bound(reference_noise: float = 0.0, dtype: str = "fp32") -> float:
    """The bound on max_rel_error when the reference itself is `reference_noise` off at this
    precision (fp32 against float64, or bf16 / fp16 against fp32)."""
    return max(FP32_BOUND, FACTOR[dtype] * reference_noise)


@dataclass
class StageResult:
    stage: str
    shape: tuple
    max_abs: float
    max_rel: float
    rel_fro: float
    cosine: float
    bound: float
    passed: bool

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def stage_metrics(stage: str, ours: np.ndarray, ref: np.ndarray, bound: float) -> StageResult:
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        return StageResult(stage, tuple(ref.shape), float("inf"), float("inf"), float("inf"),
                           float("nan"), bound, False)
    diff = ours - ref
    max_abs = float(np.abs(diff).max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    norm_ref = float(np.linalg.norm(ref))
    rel_fro = float(np.linalg.norm(diff)) / norm_ref if norm_ref > 0 else (0.0 if max_abs == 0 else float("inf"))
    denom = float(np.linalg.norm(ours)) * norm_ref
    cosine = float((ours * ref).sum() / denom) if denom > 0 else float(max_abs == 0)
    finite = bool(np.isfinite(ours).all())
    return StageResult(stage, tuple(ref.shape), max_abs, max_rel, rel_fro, cosine, bound,
                       finite and max_rel <= bound)


def compare_stages(ours: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray],
                   bounds: Mapping[str, float], order: Optional[List[str]] = None) -> List[StageResult]:
    """Compare every stage of `ref` (in `order`, default ref's order); a stage missing from
    `ours` fails."""
    results = []
    for stage in order or list(ref):
        bound = bounds[stage] if stage in bounds else bounds["default"]
        if stage not in ours:
            results.append(StageResult(stage, tuple(np.shape(ref[stage])), float("inf"), float("inf"),
                                       float("inf"), float("nan"), bound, False))
            continue
        results.append(stage_metrics(stage, ours[stage], ref[stage], bound))
    return results


def first_failure(results: List[StageResult]) -> Optional[StageResult]:
    """The first stage (data-flow order) that fails its bound, or None."""
    return next((r for r in results if not r.passed), None)


def format_table(results: List[StageResult]) -> str:
    header = f"{'stage':<16} {'shape':<18} {'max abs':>10} {'max rel':>10} {'rel fro':>10} {'cosine':>12} {'bound':>9}  ok"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.stage:<16} {str(tuple(r.shape)):<18} {r.max_abs:>10.2e} {r.max_rel:>10.2e} "
                     f"{r.rel_fro:>10.2e} {r.cosine:>12.9f} {r.bound:>9.1e}  {'yes' if r.passed else 'NO'}")
    return "\n".join(lines)


def stages_as_numpy(stages: Mapping) -> Dict[str, np.ndarray]:
    """MindSpore tensors (any float dtype) or arrays -> float32 numpy arrays."""
    out = {}
    for name, value in stages.items():
        if hasattr(value, "asnumpy"):                  # a MindSpore tensor, maybe bf16
            value = value.astype("float32").asnumpy()
        out[name] = np.asarray(value, dtype=np.float32)
    return out
