"""Search over the initial noise: best-of-N (random search) and SES (Spectral Evolution Search).

Both maximise an objective `noises (K, C, H, W) float32 -> K scores` (ms_rm.search.objectives) on
one sample's noise, (C, H, W) or (1, C, H, W) (the best noise comes back in the caller's shape); a
generation's candidates go to the objective as one batch. Both take `rng=`, a numpy Generator
that supplies every Gaussian draw (replaying a search with the caller's randomness); without it
the draws come from `seed` as below.

* Random search: the base noise, then budget - 1 fresh Gaussian draws, candidate i from
  `np.random.default_rng([seed, i])` (the record's seed pair rebuilds it), or with `rng=` the
  next rng.standard_normal((C, H, W), float32) in candidate order (record seed None); a draw
  replaces the best only when its score is strictly higher.
* SES (arXiv 2602.03208; the reference is DiffSynth-Studio's diffsynth/utils/ses/ses.py): the
  base noise's db1 wavelet split (ms_rm.search.wavelets, `levels` levels, over H and W per
  channel); its high bands stay fixed and the low band is searched by the cross-entropy method:
  mean 0 and variance 1 at the start (the base noise itself is never evaluated); generations =
  budget // popsize + 5, stopping when the budget is spent; each draws popsize candidates
  mean + z sqrt(max(var, 1e-9)) (z (popsize, n) from the seed's stream), rebuilt from their low band
  and the fixed high bands and cropped to H x W, without renormalisation; the elites are the best
  `elites` of everything evaluated so far (a stable sort, ties in evaluation order); the new mean
  is their mean and the new variance their unbiased variance + 1e-7 (unchanged while only one
  elite exists; float64-accumulated, as torch.var); the result is the best candidate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
from tqdm import tqdm

from ..core.config import is_int
from ..core.errors import InputError
from .wavelets import max_levels, wavedec2, waverec2

logger = logging.getLogger(__name__)

Objective = Callable[[np.ndarray], np.ndarray]       # (K, C, H, W) float32 -> (K,) scores
METHODS = ("random", "ses")
VAR_FLOOR, VAR_JITTER = 1e-9, 1e-7                  # the reference's clamp and added variance


@dataclass
class SearchResult:
    """The best noise and score, every candidate in evaluation order, and (SES) every generation."""

    method: str
    best_noise: np.ndarray                              # float32, shaped as the base noise given
    best_score: float
    best_index: int
    candidates: List[Dict] = field(default_factory=list)    # {"evaluation", "score", ...}
    generations: List[Dict] = field(default_factory=list)   # SES: {"mean", "var", "elites"} after each

    def best_so_far(self) -> List[float]:
        """The best score after each evaluation (the curve `ms-rm search` plots)."""
        best, out = -np.inf, []
        for c in self.candidates:
            best = max(best, c["score"])
            out.append(best)
        return out


def _check_common(base_noise: np.ndarray, budget: int, rng: Optional[np.random.Generator]) -> np.ndarray:
    """The base noise as (C, H, W) float32, after checking it, the budget and the rng."""
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise InputError(f"rng must be a numpy Generator (np.random.default_rng(...)), got {type(rng).__name__}")
    noise = np.asarray(base_noise, dtype=np.float32)
    if noise.ndim == 4:
        if noise.shape[0] != 1:
            raise InputError(f"the search looks for one sample's noise; got a batch of {noise.shape[0]}: search "
                             "each prompt separately (the reference handles batch size 1 only)")
        noise = noise[0]
    if noise.ndim != 3:
        raise InputError(f"base noise must have shape (C, H, W) or (1, C, H, W), got {noise.shape}")
    if not np.isfinite(noise).all():
        raise InputError("base noise contains NaN or Inf values")
    if not is_int(budget, 1):
        raise InputError(f"budget must be a positive number of evaluations, got {budget!r}")
    return noise


def _scores(objective: Objective, batch: np.ndarray) -> np.ndarray:
    scores = np.asarray(objective(batch), dtype=np.float64).reshape(-1)
    if scores.shape != (batch.shape[0],):
        raise InputError(f"the objective returned {scores.shape[0]} scores for {batch.shape[0]} candidates")
    if not np.isfinite(scores).all():
        raise InputError("the objective returned a NaN or infinite score")
    return scores


def random_search(objective: Objective, base_noise: np.ndarray, budget: int, seed: int = 0,
                  batch_size: int = 8, rng: Optional[np.random.Generator] = None,
                  progress: bool = False) -> SearchResult:
    """Best-of-N: the base noise and budget - 1 fresh draws, scored in batches of `batch_size`.
    `rng`: the Gaussian stream, one (C, H, W) float32 draw per candidate after the base noise
    (default: candidate i from np.random.default_rng([seed, i]))."""
    noise = _check_common(base_noise, budget, rng)
    draw = ((lambda i: rng.standard_normal(noise.shape, np.float32)) if rng is not None
            else (lambda i: np.random.default_rng([seed, i]).standard_normal(noise.shape, np.float32)))
    if not is_int(batch_size, 1):
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    candidates: List[Dict] = []
    best_noise, best_score, best_index = noise, -np.inf, -1
    bar = tqdm(total=budget, desc="random search", disable=not progress, leave=False)
    for start in range(0, budget, batch_size):
        indices = range(start, min(start + batch_size, budget))
        batch = np.stack([noise if i == 0 else draw(i) for i in indices])
        for i, candidate, score in zip(indices, batch, _scores(objective, batch)):
            candidates.append({"evaluation": i, "score": float(score),
                               "seed": None if i == 0 or rng is not None else [int(seed), i], "base": i == 0})
            if score > best_score:                        # strictly higher: ties keep the earlier one
                best_noise, best_score, best_index = candidate, float(score), i
        bar.update(len(indices))
    bar.close()
    return SearchResult("random", best_noise.reshape(np.shape(base_noise)).copy(), best_score, best_index, candidates)


def ses_search(objective: Objective, base_noise: np.ndarray, budget: int = 30, popsize: int = 10, elites: int = 5,
               levels: int = 4, seed: int = 0, rng: Optional[np.random.Generator] = None,
               progress: bool = False) -> SearchResult:
    """SES over the low band of the base noise (see the module notes). `rng`: the Gaussian stream
    (default np.random.default_rng([seed, 1])); each generation draws a (popsize, n) float32 block."""
    noise = _check_common(base_noise, budget, rng)
    if not is_int(popsize, 2):
        raise InputError(f"popsize must be an integer >= 2, got {popsize!r}")
    if not is_int(elites, 1, popsize):
        raise InputError(f"elites must be an integer in 1..popsize ({popsize}), got {elites!r}")
    height, width = noise.shape[-2:]
    if not is_int(levels, 1, max_levels(height, width)):
        raise InputError(f"{levels} wavelet levels cannot split a {height}x{width} noise: db1 allows "
                         f"1..{max_levels(height, width)} levels for that size")
    rng = rng if rng is not None else np.random.default_rng([seed, 1])     # not the stream a base noise came from
    coeffs = wavedec2(noise, levels)
    high = coeffs[1:]                                     # fixed: the base noise's high bands
    low_shape = coeffs[0].shape                           # (C, h, w)
    n = int(np.prod(low_shape))
    mean, var = np.zeros(n, np.float32), np.ones(n, np.float32)
    candidates: List[Dict] = []
    generations: List[Dict] = []
    elite_db: List[Dict] = []
    best: Optional[Dict] = None
    bar = tqdm(total=budget, desc="SES", disable=not progress, leave=False)
    for generation in range(budget // popsize + 5):
        if len(candidates) >= budget:
            break
        std = np.sqrt(np.maximum(var, np.float32(VAR_FLOOR)))
        samples = mean + rng.standard_normal((popsize, n), dtype=np.float32) * std        # (popsize, n)
        count = min(popsize, budget - len(candidates))
        lows = samples[:count]
        batch = np.stack([waverec2([low.reshape(low_shape)] + high)[..., :height, :width] for low in lows])
        results = []
        for low, draw, score in zip(lows, batch, _scores(objective, batch)):
            entry = {"evaluation": len(candidates), "generation": generation, "score": float(score), "low": low}
            candidates.append(entry)
            results.append(entry)
            if best is None or score > best["score"]:
                best = dict(entry, noise=draw)
        bar.update(count)
        elite_db = sorted(elite_db + results, key=lambda e: e["score"], reverse=True)[:elites]
        elite_lows = np.stack([e["low"] for e in elite_db])                   # (k, n)
        mean = elite_lows.mean(axis=0, dtype=np.float32)
        if len(elite_db) > 1:
            # Unbiased, accumulated in float64 and rounded to float32, as torch.var computes it on the CPU.
            var = elite_lows.astype(np.float64).var(axis=0, ddof=1).astype(np.float32) + np.float32(VAR_JITTER)
        generations.append({"generation": generation, "mean": mean.copy(), "var": var.copy(),
                            "elites": [e["evaluation"] for e in elite_db]})
    bar.close()
    return SearchResult("ses", best["noise"].astype(np.float32).reshape(np.shape(base_noise)), best["score"],
                        best["evaluation"], candidates, generations)
