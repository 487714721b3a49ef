"""The SES reference in torch + PyWavelets, for parity of ms_rm.search.

Written by us from DiffSynth-Studio's `diffsynth/utils/ses/ses.py` (`split_dwt`,
`reconstruct_dwt`, `ses_search`; the package itself is not installed here), step for step:
per-channel pywt.wavedec2(db1, symmetric) of the base noise in float32; mean 0 and variance 1
over the flattened low band; budget // popsize + 5 generations; torch float32 candidates
mean + z * sqrt(clamp(var, 1e-9)); one objective call per candidate on the pywt.waverec2
rebuild cropped to the latent size; the best of everything so far as elites (Python's stable
sort); torch.mean and torch.var(unbiased) + 1e-7. Its only change: `torch.randn(popsize, n)` is
replaced by `randn(popsize, n)`, a caller's function, so both sides draw from one numpy stream.
Every generation's state is returned for the comparison.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch


def reference_ses(base_latents: torch.Tensor, objective: Callable[[torch.Tensor], float],
                  randn: Callable[[int, int], torch.Tensor], budget: int = 30, popsize: int = 10, elites: int = 5,
                  levels: int = 4) -> Dict:
    import pywt

    height, width = base_latents.shape[-2:]
    base = base_latents.float()[0].numpy()                                   # (C, H, W)
    coeffs = pywt.wavedec2(base, "db1", level=levels, mode="symmetric", axes=(-2, -1))
    low0, high = torch.from_numpy(coeffs[0]), coeffs[1:]
    low_shape = low0.shape
    mu = torch.zeros(low0.numel())
    var = torch.ones_like(mu)
    best = {"score": -float("inf")}
    elite_db: List[Dict] = []
    evaluated: List[Dict] = []
    generations: List[Dict] = []
    for generation in range(budget // popsize + 5):
        if len(evaluated) >= budget:
            break
        samples = (mu + randn(popsize, mu.shape[0]) * torch.sqrt(torch.clamp(var, min=1e-9))).view(popsize, *low_shape)
        results = []
        for i in range(popsize):
            if len(evaluated) >= budget:
                break
            rebuilt = pywt.waverec2([samples[i].numpy()] + high, "db1", mode="symmetric", axes=(-2, -1))
            rebuilt = torch.from_numpy(rebuilt[..., :height, :width]).unsqueeze(0)
            entry = {"score": objective(rebuilt), "low": samples[i].clone(), "evaluation": len(evaluated),
                     "noise": rebuilt}
            results.append(entry)
            evaluated.append(entry)
            if entry["score"] > best["score"]:
                best = entry
        if not results:
            break
        elite_db.extend(results)
        elite_db.sort(key=lambda e: e["score"], reverse=True)
        elite_db = elite_db[:elites]
        flat = torch.stack([e["low"].view(-1) for e in elite_db])
        mu = flat.mean(dim=0)
        if len(elite_db) > 1:
            var = flat.var(dim=0, unbiased=True) + 1e-7
        generations.append({"mean": mu.numpy().copy(), "var": var.numpy().copy(),
                            "elites": [e["evaluation"] for e in elite_db]})
    return {"best": best, "evaluated": evaluated, "generations": generations}


def reference_random(base_latents: torch.Tensor, objective: Callable[[torch.Tensor], float],
                     randn: Callable[[int], torch.Tensor], budget: int) -> Dict:
    """Random search as DiffSynth-Studio's inference-time scaling tutorial describes it (written by
    us from that description): the base noise first, then budget - 1 fresh Gaussian draws
    (`randn(i)`: draw i, injected), a draw kept only when its score is strictly higher."""
    best_noise, best_score, best_index = base_latents, objective(base_latents), 0
    scores = [best_score]
    for i in range(1, budget):
        candidate = randn(i)
        score = objective(candidate)
        scores.append(score)
        if score > best_score:
            best_noise, best_score, best_index = candidate, score, i
    return {"best_noise": best_noise, "best_score": best_score, "best_index": best_index, "scores": scores}
