"""Evaluating rewards on human preference data: readers (data), the metrics as the upstream
evaluation code defines them (metrics), scores cached per sample (cache), the runs (run) and
their reports (report). `ms-rm eval` is the command line over it."""

from .data import Pair, Ranking, Sample, data_kind, read_latent, read_pairs, read_rankings
from .run import EvalReward, evaluate_pairs, evaluate_rankings, image_reward, latent_reward

__all__ = ["EvalReward", "Pair", "data_kind", "Ranking", "Sample", "evaluate_pairs", "evaluate_rankings", "image_reward",
           "latent_reward", "read_latent", "read_pairs", "read_rankings"]
