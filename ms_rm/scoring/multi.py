"""Flow-GRPO-MS's MultiScorer, extended so that a call can carry latents and prompt embeddings."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..core.config import is_number
from ..core.errors import ConfigError, InputError
from .scorers import SCORERS


class MultiScorer:
    """Flow-GRPO-MS's MultiScorer, extended so a call can carry latents and prompt embeddings.

    scorers: {name: weight}. scorer_configs: {name: kwargs for the registered class, or a ready
    scorer instance}. Names not in the registry must come as instances. A call returns
    {name: [B floats], ..., "avg": the weighted sum}; "avg" is reserved.
    Latent-aware scorers (those with score_latents) use latents and prompt embeddings when the
    call carries them; the others get images and prompts, so images may be None when every
    scorer reads latents.
    """

    def __init__(self, scorers: Mapping[str, float], scorer_configs: Optional[Mapping[str, Any]] = None):
        scorer_configs = dict(scorer_configs or {})
        if "avg" in scorers:
            raise ConfigError("'avg' is reserved for the weighted sum; name the scorer otherwise")
        unknown = sorted(set(scorer_configs) - set(scorers))
        if unknown:
            raise ConfigError(f"scorer_configs names scorers without a weight: {unknown}")
        self.scorers = dict(scorers)
        self.score_fn: Dict[str, Any] = {}
        for name, weight in self.scorers.items():
            if not is_number(weight, finite=False):
                raise ConfigError(f"weight of scorer '{name}' must be a number, got {weight!r}")
            config = scorer_configs.get(name)
            if config is not None and not isinstance(config, Mapping):
                if not callable(config):
                    raise ConfigError(f"scorer '{name}': expected a dict of arguments or a scorer instance, "
                                      f"got {type(config).__name__}")
                self.score_fn[name] = config
            elif name in SCORERS:
                self.score_fn[name] = SCORERS[name](**dict(config or {}))
            else:
                raise ConfigError(f"unknown scorer '{name}': registered are {sorted(SCORERS)}; pass other "
                                  "scorers as instances in scorer_configs")

    def __call__(self, images=None, prompts: Optional[Sequence[str]] = None, latents=None, prompt_embeds=None,
                 pooled_prompt_embeds=None, encoder_attention_mask=None) -> Dict[str, List[float]]:
        """encoder_attention_mask: (B, T) with Z-Image's padded prompt_embeds (no pooled embeddings there)."""
        details: Dict[str, List[float]] = {}
        total: Optional[List[float]] = None
        batch = None
        for name, weight in self.scorers.items():
            scorer = self.score_fn[name]
            if hasattr(scorer, "score_latents") and latents is not None:
                if prompt_embeds is None:
                    raise InputError(f"scorer '{name}' reads latents: pass prompt_embeds (and pooled_prompt_embeds "
                                     "unless it is a Z-Image model) with them")
                mask = {} if encoder_attention_mask is None else {"encoder_attention_mask": encoder_attention_mask}
                scores = scorer.score_latents(latents, prompt_embeds, pooled_prompt_embeds, **mask)
            else:
                if images is None:
                    raise InputError(f"scorer '{name}' scores images, and this call carries none")
                scores = scorer(images, prompts=prompts)
            scores = [float(s) for s in scores]
            if batch is None:
                batch = len(scores)
            elif len(scores) != batch:
                raise InputError(f"scorer '{name}' returned {len(scores)} scores, the others {batch}")
            details[name] = scores
            weighted = [weight * s for s in scores]
            total = weighted if total is None else [t + w for t, w in zip(total, weighted)]
        details["avg"] = total if total is not None else []
        return details
