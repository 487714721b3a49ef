"""What a GRPO trainer calls for its rewards: scores of the sampler's final latents, and advantages.

* `rollout_rewards(scorer, latents, prompt_embeds, pooled, prompts)`: the latent reward of a
  rollout's final clean latents, without gradient, with common noise within a prompt (samples of
  one prompt share their reward noise, so their advantages compare images, not noise draws).
* `group_advantages(prompts, rewards)`: per prompt, (r - mean) / (std + 1e-4) with the population
  std, as Flow-GRPO(-MS)'s PerPromptStatTracker computes it for one batch; `global_std=True` divides
  by the std of the whole batch instead. `PromptStatTracker` keeps the per-prompt history across
  batches until `clear()`, as that class does.
* `mixed_advantages(prompts, rewards, extra_rewards, weight)`: the advantages of the main reward
  plus `weight` times those of a second one (the reference ReFL/GRPO recipe adds 0.2 x the PickScore
  advantage to Diffusion-RM's).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..core.config import is_number
from ..core.errors import InputError

STD_EPS = 1e-4                              # Flow-GRPO's denominator guard


def _check(prompts: Sequence[Any], rewards, name: str = "rewards") -> np.ndarray:
    values = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if values.shape[0] != len(prompts):
        raise InputError(f"{name} hold {values.shape[0]} values for {len(prompts)} prompts: one per sample")
    if not np.isfinite(values).all():
        raise InputError(f"{name} contain NaN or Inf")
    return values


class PromptStatTracker:
    """Per-prompt reward statistics kept across batches (clear() starts afresh)."""

    def __init__(self, global_std: bool = False):
        self.global_std = global_std
        self.stats: Dict[Any, List[float]] = {}

    def update(self, prompts: Sequence[Any], rewards) -> np.ndarray:
        """Advantages (B,) of this batch against each prompt's rewards so far (this batch included)."""
        values = _check(prompts, rewards)
        keys = list(prompts)
        for prompt, value in zip(keys, values):
            self.stats.setdefault(prompt, []).append(float(value))
        advantages = np.zeros_like(values)
        batch_std = values.std() + STD_EPS
        for prompt in set(keys):
            history = np.asarray(self.stats[prompt])
            rows = [i for i, p in enumerate(keys) if p == prompt]
            std = batch_std if self.global_std else history.std() + STD_EPS
            advantages[rows] = (values[rows] - history.mean()) / std
        return advantages

    def clear(self) -> None:
        self.stats = {}


def group_advantages(prompts: Sequence[Any], rewards, global_std: bool = False) -> np.ndarray:
    """Per-prompt group advantages of one batch (see the module notes)."""
    return PromptStatTracker(global_std).update(prompts, rewards)


def mixed_advantages(prompts: Sequence[Any], rewards, extra_rewards, weight: float = 0.2,
                     global_std: bool = False) -> np.ndarray:
    """group_advantages(rewards) + weight x group_advantages(extra_rewards)."""
    _check(prompts, extra_rewards, "extra_rewards")
    if not is_number(weight):
        raise InputError(f"weight must be a finite number, got {weight!r}")
    return (group_advantages(prompts, rewards, global_std)
            + weight * group_advantages(prompts, extra_rewards, global_std))


def rollout_rewards(scorer: Any, latents, prompt_embeds, pooled_prompt_embeds, prompts: Sequence[Any],
                    u: Optional[float] = None) -> np.ndarray:
    """The latent reward (B,) of a rollout's final latents, without gradient, samples of one prompt
    sharing their reward noise (a Diffusion-RM scorer, ms_rm.scoring)."""
    if len(prompts) != np.shape(latents)[0]:
        raise InputError(f"got {np.shape(latents)[0]} latents and {len(prompts)} prompts: one prompt per sample")
    return np.asarray(scorer.score_latents(latents, prompt_embeds, pooled_prompt_embeds,
                                           groups=[str(p) for p in prompts], u=u), dtype=np.float64)
