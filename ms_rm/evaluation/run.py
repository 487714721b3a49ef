"""Evaluate rewards on preference data: score every sample once (cached), then measure.

A reward under evaluation is an `EvalReward`: a label, a description (what its cache records),
whether its scores depend on the noise level u and the noise (Diffusion-RM) and a function that
scores samples. `image_reward` wraps any image scorer (PickScore, CLIP score, ImageReward, a
registered pixels model, Diffusion-RM with its SD3 encoders); `latent_reward` wraps a
Diffusion-RM scorer over latents.

Noise (Diffusion-RM): each sample's noise is drawn from (seed, its noise id), K draws averaged
(the scorer's `num_noise_draws`). The noise id is the pair's index (a ranking's index), so the
chosen and the rejected sample of a pair share their noise, as the reference's validation adds
one noise to both; the same noise serves every u of the grid. Scores therefore do not depend on
the batch, the order of the work or the number of msrun workers.

Under msrun every rank reads the cache, scores its shard of what is missing, and the scores are
gathered; only the main rank writes the cache and the report.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from ..core.distributed import World
from ..core.errors import InputError
from ..scoring.runs import score_pairs
from . import metrics
from .cache import ScoreCache
from .data import Pair, ParquetLatents, Ranking, Sample, read_latent

logger = logging.getLogger(__name__)

# samples, prompts, noise ids, u -> (N,) float scores
ScoreFunction = Callable[[Sequence[Sample], Sequence[str], Sequence[int], Optional[float]], np.ndarray]


@dataclass
class EvalReward:
    label: str
    score: ScoreFunction
    description: Dict
    noisy: bool = False                                # scores depend on u and the noise
    us: Sequence[float] = ()                           # noisy: the grid of u to measure
    u: Optional[float] = None                          # noisy: the u of the headline figure, agreement and mixes

    def __post_init__(self):
        if self.noisy:
            self.us = [float(u) for u in (self.us or [self.u])]
            if self.u is None:
                self.u = self.us[0]
            if self.u not in self.us:
                self.us = sorted(set(self.us) | {self.u})


# --- rewards ---------------------------------------------------------------------------------------

def image_reward(label: str, scorer, description: Mapping, batch_size: int = 8, world: World = World(),
                 progress: bool = True, us: Sequence[float] = (), u: Optional[float] = None,
                 prompt_table=None) -> EvalReward:
    """An image scorer `scorer(images, prompts[, sample_ids=])` as an EvalReward. A Diffusion-RM
    scorer (it has `default_u`) is noisy: its `u` is set per grid point and it needs a seed;
    prompt_table: its prompts' embeddings, encoded beforehand (ms_rm.scoring.runs.PromptTable)."""
    noisy = hasattr(scorer, "default_u")
    if noisy and getattr(scorer, "seed", None) is None:
        raise InputError(f"{label}: evaluating Diffusion-RM needs a seed (the noise is drawn per pair from it)")

    def score(samples, prompts, noise_ids, u_value):
        if noisy:
            scorer.u = u_value
        rows = score_pairs(scorer, [(s.path, p) for s, p in zip(samples, prompts)], batch_size=batch_size,
                           progress=progress, world=world, prompt_table=prompt_table, noise_ids=noise_ids)
        return np.array([row["score"] for row in rows], np.float64)

    if noisy and u is None:
        u = scorer.default_u("images")
    return EvalReward(label, score, dict(description), noisy, us, u)


def latent_reward(label: str, scorer, text_conds: Callable[[Sequence[str]], Dict[str, np.ndarray]],
                  description: Mapping, batch_size: int = 8, world: World = World(), progress: bool = True,
                  us: Sequence[float] = (), u: Optional[float] = None) -> EvalReward:
    """A Diffusion-RM scorer over latent samples (.npy files, parquet rows). text_conds(prompts)
    gives the prompt embeddings (encoder_hidden_states, pooled_projections, optionally
    encoder_attention_mask) of a batch."""
    if getattr(scorer, "seed", None) is None:
        raise InputError(f"{label}: evaluating Diffusion-RM needs a seed (the noise is drawn per pair from it)")
    parquet = ParquetLatents()

    def score(samples, prompts, noise_ids, u_value):
        mine = world.shard(len(samples))
        by_shape: Dict[Tuple[int, ...], List[int]] = {}
        latents = {}
        for i in range(mine.start, mine.stop):
            latents[i] = read_latent(samples[i], parquet)
            by_shape.setdefault(latents[i].shape, []).append(i)
        scores = np.zeros(len(samples), np.float32)
        with tqdm(total=mine.stop - mine.start, unit="sample", desc=f"{label} u={u_value}",
                  disable=not progress) as bar:
            for group in by_shape.values():
                target = min(batch_size, len(group))          # one batch size per shape: one compiled graph
                for start in range(0, len(group), batch_size):
                    batch = group[start:start + batch_size]
                    filled = batch + [batch[0]] * (target - len(batch))
                    conds = text_conds([prompts[i] for i in filled])
                    values = scorer.score_latents(np.stack([latents[i] for i in filled]),
                                                  conds["encoder_hidden_states"], conds.get("pooled_projections"),
                                                  u=u_value, sample_ids=[int(noise_ids[i]) for i in filled],
                                                  encoder_attention_mask=conds.get("encoder_attention_mask"))
                    scores[batch] = values[:len(batch)]
                    bar.update(len(batch))
        return world.gather_rows(scores[mine][:, None], len(samples))[:, 0].astype(np.float64)

    if u is None:
        u = scorer.default_u("latents")
    return EvalReward(label, score, dict(description), True, us, u)


# --- scoring with the cache ------------------------------------------------------------------------

@dataclass
class Scored:
    """A reward's scores of every sample the data lists, per u (None for a reward without noise)."""
    by_u: Dict[Optional[float], np.ndarray] = field(default_factory=dict)


CHUNK = 256                 # samples scored between two cache writes (per worker): what an interruption can lose


def score_all(reward: EvalReward, samples: Sequence[Sample], prompts: Sequence[str], noise_ids: Sequence[int],
              out: str, world: World = World()) -> Scored:
    """Scores of the samples (cached in out/scores/<label>.jsonl): only what the cache lacks is
    scored, CHUNK samples per worker at a time, each chunk written to the cache as it is done.
    Under msrun no rank returns before the main rank has written its last chunk, so a cache read
    next (another call over the same folder) is the same on every rank."""
    cache = ScoreCache(os.path.join(out, "scores", f"{reward.label}.jsonl"), reward.description,
                       writer=world.is_main)
    scored = Scored()
    for u in (reward.us if reward.noisy else [None]):
        keys = [_key(s, p, n, u, reward.noisy) for s, p, n in zip(samples, prompts, noise_ids)]
        todo = list(dict.fromkeys(k for k in keys if k not in cache))        # distinct, in order
        _same_on_every_rank(world, len(todo), f"{reward.label}: the samples left to score")
        if todo:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            logger.info("%s%s: scoring %d samples (%d cached)", reward.label, "" if u is None else f" u={u}",
                        len(todo), len(set(keys)) - len(todo))
            step = CHUNK * world.size
            for start in range(0, len(todo), step):
                chunk = todo[start:start + step]
                rows = [first[k] for k in chunk]
                values = reward.score([samples[i] for i in rows], [prompts[i] for i in rows],
                                      [noise_ids[i] for i in rows], u)
                if not np.all(np.isfinite(values)):
                    bad = [chunk[i] for i in np.flatnonzero(~np.isfinite(values))[:3]]
                    raise InputError(f"{reward.label}: non-finite scores for {bad}; nothing of them was cached")
                cache.add(zip(chunk, values.tolist()))
        scored.by_u[u] = np.array([cache[k] for k in keys], np.float64)
    world.barrier()
    return scored


def _same_on_every_rank(world: World, count: int, what: str) -> None:
    """Every rank must have the same work list: they read one cache (a folder on a filesystem all
    workers share); a mismatch fails on every rank instead of leaving some in a collective."""
    if world.size == 1:
        return
    counts = world.gather_rows(np.array([[count]], np.float32), world.size)[:, 0]
    if len(set(counts.tolist())) > 1:
        raise InputError(f"{what} differ between the workers ({counts.astype(int).tolist()}): --out must be a "
                         "folder every worker reads the same (a shared filesystem)")


def _key(sample: Sample, prompt: str, noise_id: int, u: Optional[float], noisy: bool) -> str:
    key = f"{sample.key()}\t{prompt}"
    return f"{key}\tu={u!r}\tnoise={noise_id}" if noisy else key


# --- evaluation ------------------------------------------------------------------------------------

def evaluate_pairs(pairs: Sequence[Pair], rewards: Sequence[EvalReward], out: str,
                   weights: Optional[Mapping[str, float]] = None, world: World = World(),
                   bootstrap: int = 1000, seed: int = 0) -> Dict:
    """Pairwise accuracy (with a bootstrap interval) of each reward at each u; with several rewards,
    their agreement and the weighted combination's accuracy. The report as a dict."""
    samples = [s for p in pairs for s in (p.chosen, p.rejected)]
    prompts = [p.prompt for p in pairs for _ in range(2)]
    noise_ids = [i for i in range(len(pairs)) for _ in range(2)]            # a pair shares its noise
    report = {"kind": "pairs", "pairs": len(pairs), "bootstrap": bootstrap, "rewards": {}}
    headline: Dict[str, np.ndarray] = {}
    for reward in _unique(rewards):
        scored = score_all(reward, samples, prompts, noise_ids, out, world)
        results = []
        for u, values in scored.by_u.items():
            chosen, rejected = values[0::2], values[1::2]
            correct = metrics.pairwise_correct(chosen, rejected)
            interval = metrics.bootstrap_interval(correct, bootstrap, seed=seed)
            results.append({"u": u, "accuracy": float(correct.mean()), "interval": [interval.low, interval.high]})
        headline[reward.label] = scored.by_u[reward.u]
        report["rewards"][reward.label] = {"description": reward.description, "u": reward.u, "results": results}
    differences = {label: v[0::2] - v[1::2] for label, v in headline.items()}
    report["agreement"] = [{"rewards": [a, b], "fraction": metrics.agreement(differences[a], differences[b])}
                           for a, b in _pairs_of(list(headline))]
    if weights:
        mixed = metrics.weighted_sum(headline, weights)
        correct = metrics.pairwise_correct(mixed[0::2], mixed[1::2])
        interval = metrics.bootstrap_interval(correct, bootstrap, seed=seed)
        report["combination"] = {"weights": dict(weights), "accuracy": float(correct.mean()),
                                 "interval": [interval.low, interval.high]}
    return report


def evaluate_rankings(rankings: Sequence[Ranking], rewards: Sequence[EvalReward], out: str,
                      weights: Optional[Mapping[str, float]] = None, world: World = World()) -> Dict:
    """ImageReward's acc, HPSv2's ImageReward accuracy and inversion score of each reward at each u;
    with several rewards, pair agreement and Kendall's tau per prompt, and the combination's metrics."""
    samples = [s for r in rankings for s in r.samples]
    prompts = [r.prompt for r in rankings for _ in r.samples]
    noise_ids = [k for k, r in enumerate(rankings) for _ in r.samples]      # a ranking shares its noise
    cuts = np.cumsum([len(r.samples) for r in rankings])[:-1]
    ranks = [r.ranks for r in rankings]
    report = {"kind": "rankings", "rankings": len(rankings), "generations": len(samples), "rewards": {}}
    headline: Dict[str, List[np.ndarray]] = {}
    for reward in _unique(rewards):
        scored = score_all(reward, samples, prompts, noise_ids, out, world)
        results = []
        for u, values in scored.by_u.items():
            results.append(dict({"u": u}, **ranking_metrics(ranks, np.split(values, cuts))))
        headline[reward.label] = np.split(scored.by_u[reward.u], cuts)
        report["rewards"][reward.label] = {"description": reward.description, "u": reward.u, "results": results}
    report["agreement"] = []
    for a, b in _pairs_of(list(headline)):
        diff_a = np.concatenate([_pair_differences(s) for s in headline[a]])
        diff_b = np.concatenate([_pair_differences(s) for s in headline[b]])
        tau = metrics.mean_kendall_tau(headline[a], headline[b])
        report["agreement"].append({"rewards": [a, b], "fraction": metrics.agreement(diff_a, diff_b),
                                    "kendall_tau": tau.value, "kendall_tau_prompts": tau.prompts})
    if weights:
        flat = {label: np.concatenate(v) for label, v in headline.items()}
        mixed = np.split(metrics.weighted_sum(flat, weights), cuts)
        report["combination"] = dict({"weights": dict(weights)}, **ranking_metrics(ranks, mixed))
    return report


def ranking_metrics(ranks, scores) -> Dict:
    hps_ir = metrics.hpsv2_imagereward_acc(ranks, scores)
    inversion = metrics.hpsv2_inversion_score(ranks, scores)
    return {"imagereward_acc": metrics.imagereward_acc(ranks, scores),
            "hpsv2_imagereward_acc": hps_ir.value, "hpsv2_imagereward_acc_left_out": hps_ir.left_out,
            "hpsv2_inversion_score": inversion.value}


def _pair_differences(scores: np.ndarray) -> np.ndarray:
    i, j = np.triu_indices(scores.size, k=1)
    return scores[i] - scores[j]


def _pairs_of(labels: List[str]):
    return [(a, b) for k, a in enumerate(labels) for b in labels[k + 1:]]


def _unique(rewards: Sequence[EvalReward]) -> Sequence[EvalReward]:
    labels = [r.label for r in rewards]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise InputError(f"two rewards are labelled {repeated}: give each its own label (LABEL=KIND:FOLDER)")
    if not rewards:
        raise InputError("no reward to evaluate")
    return rewards
