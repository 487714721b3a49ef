"""Inference-time search over the initial noise: best-of-N and SES (Spectral Evolution Search),
with any ms_rm reward as the objective (latent rewards need no decode)."""

from .methods import METHODS, SearchResult, random_search, ses_search
from .objectives import GenerateAndScore

__all__ = ["METHODS", "SearchResult", "random_search", "ses_search", "GenerateAndScore"]
