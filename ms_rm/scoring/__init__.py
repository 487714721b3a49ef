"""Scoring: the scorer protocol and registry, MultiScorer, image preprocessing, and score runs
over files (what `ms-rm score` and `ms-rm score-images` do)."""

from .clip import CLIPScorer, PickScoreScorer
from .multi import MultiScorer
from .scorers import (SCORERS, DiffusionRMFluxScorer, DiffusionRMScorer, DiffusionRMSD3Scorer, DiffusionRMZImageScorer,
                      Scorer)

__all__ = ["Scorer", "SCORERS", "DiffusionRMScorer", "DiffusionRMSD3Scorer", "DiffusionRMFluxScorer",
           "DiffusionRMZImageScorer", "MultiScorer", "PickScoreScorer", "CLIPScorer"]
