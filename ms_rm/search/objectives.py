"""What a noise search maximises: generate from each candidate noise and score the result.

    objective = GenerateAndScore(generator, prompt_embeds, pooled, rewards=[(diffusion_rm, 1.0)],
                                 num_inference_steps=28, guidance_scale=4.5, negative_prompt_embeds=neg,
                                 negative_pooled_prompt_embeds=neg_pooled)
    scores = objective(noises)                       # (K, C, H, W) -> (K,)

Rewards are (model, weight) pairs, summed. A latent reward (`input_kind == "latents"`, e.g.
Diffusion-RM through the RewardModel protocol) scores the generated latents directly with the
prompt's embeddings, at `u` and with the same reward noise for every candidate (`reward_seed`), so
candidates differ by their generation only; no VAE decode. A pixel reward (`input_kind ==
"pixels"`, any object with `score(images, prompts) -> list of floats` taking uint8 (K, H, W, 3)
images) needs `decoder` (ms_rm.vae.decoder) and the prompt text.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ..core.errors import ConfigError, InputError


class GenerateAndScore:
    """noise (K, C, H, W) -> the weighted sum of the rewards of what the generator makes of it."""

    def __init__(self, generator: Any, prompt_embeds, pooled_prompt_embeds, rewards: Sequence[Tuple[Any, float]],
                 num_inference_steps: int = 28, guidance_scale: float = 7.0, negative_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, u: float = 0.4, reward_seed: int = 0, decoder: Any = None,
                 prompt: Optional[str] = None):
        if not rewards:
            raise ConfigError("pass at least one (reward model, weight) pair")
        for model, weight in rewards:
            kind = getattr(model, "input_kind", None)
            if kind not in ("latents", "pixels"):
                raise ConfigError(f"{type(model).__name__} is not a reward model (input_kind 'latents' or 'pixels')")
            if not callable(getattr(model, "score", None)):
                raise ConfigError(f"{type(model).__name__} has no score method: pass a reward model (the RewardModel "
                                  "protocol: DiffusionRM.score(latents, embeds, pooled, u=, noise=))")
            if kind == "pixels" and (decoder is None or prompt is None):
                raise ConfigError(f"{type(model).__name__} scores pixels: pass decoder= (the VAE decoder) and prompt=")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight):
                raise ConfigError(f"reward weights must be finite, got {weight}")
        self.generator, self.rewards, self.decoder, self.prompt = generator, list(rewards), decoder, prompt
        self.embeds = [np.asarray(a, np.float32) if a is not None else None for a in
                       (prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds)]
        for name, array in zip(("prompt_embeds", "pooled_prompt_embeds"), self.embeds[:2]):
            if array is None or array.shape[0] != 1:
                raise InputError(f"{name} must hold one prompt (batch 1): a search is per prompt")
        self.steps, self.guidance, self.u, self.reward_seed = num_inference_steps, guidance_scale, u, reward_seed

    def _tiled(self, k: int) -> List[Optional[np.ndarray]]:
        return [None if a is None else np.repeat(a, k, axis=0) for a in self.embeds]

    def __call__(self, noises: np.ndarray) -> np.ndarray:
        k = noises.shape[0]
        ehs, pooled, neg, neg_pooled = self._tiled(k)
        latents = self.generator.generate(ehs, pooled, noises, self.steps, self.guidance, neg, neg_pooled)
        total = np.zeros(k)
        images = None
        for model, weight in self.rewards:
            if model.input_kind == "latents":
                # One reward noise, drawn once from reward_seed, for every candidate.
                eps = np.random.default_rng(self.reward_seed).standard_normal((1,) + tuple(latents.shape[1:]),
                                                                              dtype=np.float32)
                scores = model.score(latents, ehs, pooled, u=self.u, noise=np.repeat(eps, k, axis=0))
            else:
                if images is None:
                    images = self.decoder.to_images(latents)
                scores = model.score(images, [self.prompt] * k)
            total += weight * np.asarray(scores, dtype=np.float64)
        return total
