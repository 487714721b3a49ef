"""Accuracy of a reward against human preferences, each metric as the upstream evaluation code defines it.

Pairs (chosen, rejected): `pairwise_accuracy`, the fraction of pairs whose chosen sample scores
strictly higher (a tie in the scores counts as wrong, as the Diffusion-RM reference's validation
counts `(chosen - rejected) > 0`), with `bootstrap_interval` for its 95% interval.

Rankings (per prompt, several generations with human ranks, 1 = best; gaps and ties are normal):
three metrics that differ, each under its upstream name.

* `imagereward_acc`: ImageReward's `test.py` `acc`. Every pair (i, j) of every prompt's
  generations that the humans ranked differently counts; pairs the humans tied are skipped; the
  pair is right when the better-ranked generation scores strictly higher (a tie in the scores is
  wrong). Pooled: right pairs / counted pairs over the whole set.
* `hpsv2_imagereward_acc`: HPSv2's `calc_ImageReward` as `evaluation.py` (`evaluate_IR`) uses it:
  the same pair rule per prompt, then the mean over prompts. A prompt whose generations the
  humans tied entirely has no pair to count (HPSv2's code divides by zero there); it is left out
  of the mean and counted in the result.
* `hpsv2_inversion_score`: HPSv2's `inversion_score` (`evaluate_rank`). The model's scores become
  ranks (`argsort(-scores)`: equal scores ordered by position, stable); a pair is an inversion
  when the model's and the humans' ranks order it strictly opposite. Per prompt
  1 - inversions / (n (n - 1) / 2): human ties stay in the denominator and are never inversions.
  Mean over prompts.
Per-prompt means are correctly rounded (math.fsum); HPSv2 accumulates them per loader batch, so
the two agree to ~1e-15, not bit for bit.

Several rewards: `agreement` (the fraction of pairs two rewards order the same way), and
`kendall_tau` (tau-b, per prompt, then averaged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..core.errors import InputError


# --- pairs -----------------------------------------------------------------------------------------

def pairwise_correct(chosen: Sequence[float], rejected: Sequence[float]) -> np.ndarray:
    """(N,) bool: chosen scored strictly above rejected."""
    chosen, rejected = _scores(chosen, "chosen"), _scores(rejected, "rejected")
    if chosen.shape != rejected.shape:
        raise InputError(f"{chosen.size} chosen scores for {rejected.size} rejected ones")
    return chosen > rejected


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    correct = pairwise_correct(chosen, rejected)
    if correct.size == 0:
        raise InputError("no pairs to measure")
    return float(correct.mean())


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    level: float = 0.95
    resamples: int = 1000


def bootstrap_interval(correct: Sequence[bool], resamples: int = 1000, level: float = 0.95,
                       seed: int = 0) -> Interval:
    """The percentile bootstrap interval of the mean of `correct`: `resamples` draws of N pairs
    with replacement from numpy's default_rng(seed); the (1 - level) / 2 and (1 + level) / 2
    quantiles (numpy's default, linear) of the resampled accuracies."""
    values = np.asarray(correct, np.float64)
    if values.ndim != 1 or values.size == 0:
        raise InputError("the bootstrap needs a non-empty 1-D array of outcomes")
    if not 0 < level < 1:
        raise InputError(f"level must lie in (0, 1), got {level}")
    draws = np.random.default_rng(seed).integers(0, values.size, size=(resamples, values.size))
    means = values[draws].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(low), float(high), level, resamples)


# --- rankings --------------------------------------------------------------------------------------

def _pair_counts(ranks: np.ndarray, scores: np.ndarray) -> Tuple[int, int]:
    """(right, counted) over the pairs of one prompt, ImageReward's rule: human ties skipped, a
    model tie wrong."""
    i, j = np.triu_indices(ranks.size, k=1)
    human = np.sign(ranks[j] - ranks[i])           # +1: i ranked better (smaller rank number)
    model = np.sign(scores[i] - scores[j])         # +1: i scored higher
    counted = human != 0
    return int(np.sum(counted & (human == model))), int(np.sum(counted))


def imagereward_acc(ranks: Sequence[Sequence[float]], scores: Sequence[Sequence[float]]) -> float:
    """ImageReward's `acc`: right / counted pairs, pooled over all prompts."""
    right = counted = 0
    for r, s in _rankings(ranks, scores):
        a, b = _pair_counts(r, s)
        right, counted = right + a, counted + b
    if counted == 0:
        raise InputError("every ranking is a human tie: no pair to measure")
    return right / counted


@dataclass(frozen=True)
class PerPrompt:
    value: float              # the mean over the prompts that count
    prompts: int              # how many count
    left_out: int = 0         # prompts the metric cannot measure (all generations tied by the humans)


def hpsv2_imagereward_acc(ranks: Sequence[Sequence[float]], scores: Sequence[Sequence[float]]) -> PerPrompt:
    """HPSv2's `calc_ImageReward`, averaged over prompts (prompts the humans tied entirely left out)."""
    values, left_out = [], 0
    for r, s in _rankings(ranks, scores):
        right, counted = _pair_counts(r, s)
        if counted == 0:
            left_out += 1
        else:
            values.append(right / counted)
    if not values:
        raise InputError("every ranking is a human tie: no pair to measure")
    return PerPrompt(_mean(values), len(values), left_out)


def model_ranks(scores: Sequence[float]) -> np.ndarray:
    """0 = the highest score; equal scores ranked by position (HPSv2: argsort(-scores), then the
    position of each generation in that order)."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    ranks = np.empty(order.size, np.int64)
    ranks[order] = np.arange(order.size)
    return ranks


def inversion_score(ranks: Sequence[float], scores: Sequence[float]) -> float:
    """HPSv2's `inversion_score` of one prompt: 1 - strict inversions / (n (n - 1) / 2)."""
    human = np.asarray(ranks, np.float64)
    model = model_ranks(scores)
    i, j = np.triu_indices(human.size, k=1)
    inversions = np.sum(np.sign(model[i] - model[j]) * np.sign(human[i] - human[j]) < 0)
    n = human.size
    return 1.0 - inversions / (n * (n - 1) / 2)


def hpsv2_inversion_score(ranks: Sequence[Sequence[float]], scores: Sequence[Sequence[float]]) -> PerPrompt:
    values = [inversion_score(r, s) for r, s in _rankings(ranks, scores)]
    return PerPrompt(_mean(values), len(values))


# --- several rewards -------------------------------------------------------------------------------

def agreement(first: Sequence[float], second: Sequence[float]) -> float:
    """The fraction of pair differences (one per pair: chosen - rejected) two rewards sign alike."""
    a, b = _scores(first, "first"), _scores(second, "second")
    if a.shape != b.shape or a.size == 0:
        raise InputError(f"agreement needs two equal, non-empty sets of differences, got {a.size} and {b.size}")
    return float(np.mean(np.sign(a) == np.sign(b)))


def kendall_tau(first: Sequence[float], second: Sequence[float]) -> float:
    """Kendall's tau-b of two score lists (NaN when either is constant), as scipy.stats.kendalltau."""
    a, b = np.asarray(first, np.float64), np.asarray(second, np.float64)
    i, j = np.triu_indices(a.size, k=1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    untied_a, untied_b = np.sum(da != 0), np.sum(db != 0)      # pairs each list does not tie
    if untied_a == 0 or untied_b == 0:
        return float("nan")
    return float(np.sum(da * db) / np.sqrt(untied_a * untied_b))     # (concordant - discordant) / ...


def mean_kendall_tau(first: Sequence[Sequence[float]], second: Sequence[Sequence[float]]) -> PerPrompt:
    """tau-b per prompt, averaged over the prompts where it is defined."""
    taus = [kendall_tau(a, b) for a, b in _rankings(first, second)]
    defined = [t for t in taus if not np.isnan(t)]
    if not defined:
        raise InputError("Kendall's tau is undefined for every prompt (constant scores)")
    return PerPrompt(_mean(defined), len(defined), len(taus) - len(defined))


def weighted_sum(scores: Dict[str, np.ndarray], weights: Dict[str, float]) -> np.ndarray:
    """sum_k weight_k * scores_k, as MultiScorer's "avg"."""
    missing = sorted(set(weights) - set(scores))
    if missing:
        raise InputError(f"weights name rewards that were not scored: {missing}")
    return sum(float(w) * np.asarray(scores[k], np.float64) for k, w in weights.items())


def _mean(values: Sequence[float]) -> float:
    """The correctly rounded mean (HPSv2 sums per batch of its loader, so its last digit follows
    its batch size)."""
    return math.fsum(values) / len(values)


# --- checks ------------------------------------------------------------------------------------------

def _scores(values: Sequence[float], what: str) -> np.ndarray:
    array = np.asarray(values, np.float64).reshape(-1)
    if not np.all(np.isfinite(array)):
        raise InputError(f"{what} scores hold NaN or infinity at {np.flatnonzero(~np.isfinite(array))[:5].tolist()}")
    return array


def _rankings(ranks, scores) -> List[Tuple[np.ndarray, np.ndarray]]:
    if len(ranks) != len(scores):
        raise InputError(f"{len(ranks)} rankings for {len(scores)} score lists")
    out = []
    for k, (r, s) in enumerate(zip(ranks, scores)):
        r, s = np.asarray(r, np.float64), _scores(s, f"ranking {k}'s")
        if r.size != s.size or r.size < 2:
            raise InputError(f"ranking {k}: {r.size} ranks for {s.size} scores (two or more of each needed)")
        out.append((r, s))
    if not out:
        raise InputError("no rankings to measure")
    return out
