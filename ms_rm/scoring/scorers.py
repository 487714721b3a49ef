"""Scorers: reward models behind Flow-GRPO-MS's scorer call, and their registry.

The Scorer protocol is Flow-GRPO-MS's: `scorer(images, prompts) -> list[float]`, one float per
sample; a scorer of latents (input_kind "latents") also offers `score_latents(latents,
prompt_embeds, pooled_prompt_embeds)`, which MultiScorer (ms_rm.scoring.multi) calls when a
trainer hands it latents. `SCORERS` maps registry names to scorer classes. Diffusion-RM scores
latents, so at the scoring call a trainer that already holds the
final latents and prompt embeddings can skip the VAE decode, the image round trip, the VAE
re-encode and three text encoders: `scorer.score_latents(latents, prompt_embeds, pooled)`, or
`multi(images, prompts, latents=..., prompt_embeds=..., pooled_prompt_embeds=...)`.

The reward is stochastic through its noise. The scorer's noise policy (a NoisePolicy,
ms_rm.rewards.diffusion_rm.noise, the one the model's own calls use too) draws a call's noise once,
for the whole batch, and hands it to the model's `prepare`; the inputs are checked once, by the
model's `check_inputs`, before the batch is split:
* `noise="fresh"` (default, as the reference): new noise on every call, from a generator
  seeded once with `seed` when given (a reproducible sequence);
* `noise="fixed"`: the same noise on every call (drawn from `seed`);
* `common_noise=True`: samples with the same prompt share their noise within a call (common
  random numbers, what GRPO's per-prompt advantages want);
* `num_noise_draws=K`: the mean reward over K independent noises;
* `ensemble_u=[...]`: the reference's multi-level ensemble forward instead of one u.
Noise is drawn for the whole batch before `max_batch` splits it, so splitting changes nothing, except
for Z-Image, whose reference batching makes a shorter caption's reward depend on the longest caption
of its chunk (max_batch=1 scores every sample alone).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint

from ..core.config import is_int
from ..core.errors import ConfigError, InputError
from ..backbones.protocol import take_rows
from ..core.inputs import as_float_tensor
from ..rewards.diffusion_rm import DiffusionRM, recommended_u
from ..rewards.diffusion_rm.model import RewardInputs
from ..rewards.diffusion_rm.noise import NOISE_POLICIES, NoisePolicy  # noqa: F401  (NOISE_POLICIES: this module's name too)
from .aesthetic import AestheticScorer
from .blip_score import BLIPScoreScorer
from .clip import CLIPScorer, PickScoreScorer
from .images import SIZE_POLICIES, fitted_size, group_by_size, preprocess, split_batch
from .hpsv2 import HPSv2Scorer
from .imagereward import ImageRewardScorer
from .jpeg import JpegCompressibilityScorer, JpegIncompressibilityScorer

logger = logging.getLogger(__name__)

NORMALIZATIONS = {
    "none": (1.0, 0.0),            # the raw head output
    "reference": (0.1, 1.0),       # (raw + 10) / 10, the reference README's display form
    "flow-grpo-ms": (0.2, 0.0),    # raw / 5, the Flow-GRPO-MS integration's scale
}


def _normalization(value) -> Tuple[float, float]:
    if isinstance(value, str):
        if value not in NORMALIZATIONS:
            raise ConfigError(f"normalize must be one of {sorted(NORMALIZATIONS)} or (scale, offset), got {value!r}")
        return NORMALIZATIONS[value]
    try:
        scale, offset = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"normalize must be a name or a (scale, offset) pair, got {value!r}") from None
    return scale, offset


@runtime_checkable
class Scorer(Protocol):
    """Flow-GRPO-MS's scorer: one float per (image, prompt) pair."""

    name: str
    input_kind: str                     # "latents" (offers score_latents too) or "pixels"

    def __call__(self, images: Any, prompts: Optional[Sequence[str]] = None) -> List[float]: ...


class DiffusionRMScorer:
    """A Diffusion-RM reward model with a noise policy, as a Flow-GRPO-MS scorer.

    checkpoint_path: a folder written by `ms-rm convert`; or pass `model=` (a DiffusionRM).
    u: the noise level. Default: the recommended level of each kind of input, one table for all
       of ms_rm (ms_rm.rewards.diffusion_rm.RECOMMENDED_U): 0.4 for sampler latents
       (`reward`, `score_latents`), 0.1 for images encoded from disk (`__call__`), under the
       sigma convention; 0.9 for latents under the index one. Ignored with `ensemble_u`.
    normalize: "none" (raw), "reference" ((raw + 10) / 10), "flow-grpo-ms" (raw / 5), or a
       (scale, offset) pair applied as raw * scale + offset.
    max_batch: split larger batches into chunks of this size (None: never split).
    encoder: an object with `encode_pixels(pixels) -> latents` and `encode_prompts(prompts) ->
       (prompt_embeds, pooled_prompt_embeds)` (see ms_rm.encoders); needed only for
       `__call__(images, prompts)`.
    size_policy: how `__call__` fits image sizes to multiples of 16 pixels: "crop" (center crop,
       the default), "resize", "bucket" (resize to the 64-pixel grid: one compiled graph per
       bucket) or "error" (see ms_rm.scoring.images).
    """

    name = "diffusion-rm"
    input_kind = "latents"
    family = None                       # the backbone family this scorer class expects, if any

    def __init__(self, checkpoint_path: Optional[str] = None, *, model: Optional[DiffusionRM] = None,
                 u: Optional[float] = None, normalize: Union[str, Sequence[float]] = "none",
                 seed: Optional[int] = None, noise: str = "fresh", common_noise: bool = False,
                 num_noise_draws: int = 1, ensemble_u: Optional[Sequence[float]] = None,
                 max_batch: Optional[int] = None, encoder: Any = None, size_policy: str = "crop", dtype: ms.Type = ms.float32,
                 mode: str = "graph", verify: bool = False):
        if (checkpoint_path is None) == (model is None):
            raise ConfigError("pass exactly one of checkpoint_path (a folder written by ms-rm convert) or model")
        self.model = model if model is not None else DiffusionRM.from_pretrained(
            checkpoint_path, dtype=dtype, mode=mode, verify=verify)
        family = self.model.config.backbone.family
        if self.family is not None and family != self.family:
            raise ConfigError(f"{type(self).__name__} scores {self.family} models; this checkpoint's backbone is "
                              f"{family}: use the scorer of that family")
        # the scorer's noise policy: what it draws for a call goes to the model's prepare (noise=)
        self.noise_policy = NoisePolicy(seed, noise, num_noise_draws,
                                        1 if ensemble_u is None else max(1, len(ensemble_u)))
        if max_batch is not None and not is_int(max_batch, 1):
            raise ConfigError(f"max_batch must be a positive integer or None, got {max_batch!r}")
        self.u = u                      # None: the recommended u of each kind of input (see default_u)
        self.ensemble_u = None if ensemble_u is None else [float(v) for v in ensemble_u]
        if self.ensemble_u is not None and not self.ensemble_u:
            raise ConfigError("ensemble_u must list at least one noise level")
        self.scale, self.offset = _normalization(normalize)
        self.seed, self.noise, self.common_noise = seed, noise, common_noise
        self.num_noise_draws, self.max_batch, self.encoder = num_noise_draws, max_batch, encoder
        if size_policy not in SIZE_POLICIES:
            raise ConfigError(f"size_policy must be one of {SIZE_POLICIES}, got {size_policy!r}")
        self.size_policy = size_policy

    def fitted_size(self, height: int, width: int) -> Tuple[int, int]:
        """The size `__call__` fits an image of height x width pixels to (its size policy)."""
        return fitted_size(height, width, self.size_policy)

    def default_u(self, inputs: str) -> float:
        """The u a call uses: the scorer's `u`, else the recommended u for `inputs` ("latents" from
        a sampler: 0.4; "images" encoded from disk: 0.1; sigma convention)."""
        if self.u is not None:
            return self.u
        return recommended_u(inputs, self.model.config.u_convention)

    # --- noise ---------------------------------------------------------------------------
    def draw_noise(self, shape: Tuple[int, ...], groups: Optional[Sequence[Any]] = None,
                   sample_ids: Optional[Sequence[int]] = None) -> np.ndarray:
        """Noise for one call: (draws, levels, B, C, H, W) under the scorer's policy (NoisePolicy.draw:
        `groups` share noise per key, `sample_ids` draw each sample's from (seed, id))."""
        return self.noise_policy.draw(shape, groups, sample_ids)

    # --- scoring -----------------------------------------------------------------------------
    def reward(self, latents, text_conds: Mapping[str, Any], u: Optional[float] = None,
               groups: Optional[Sequence[Any]] = None, sample_ids: Optional[Sequence[int]] = None) -> Tensor:
        """Normalized rewards (B, 1) of latents (B, C, H, W); text_conds holds the prompt embeddings
        under `encoder_hidden_states` and `pooled_projections` (Z-Image: `encoder_hidden_states`, a
        list of (T_i, D) or padded with `encoder_attention_mask`). Differentiable w.r.t. the latents.
        u: this call's noise level (default: `default_u("latents")`); sample_ids: see draw_noise."""
        needed = self.model.backbone.text_inputs
        missing = [k for k in needed if k not in text_conds]
        if missing:
            raise InputError(f"text_conds lacks {missing}; it must hold {' and '.join(needed)}")
        # checked once, here, for the whole batch; the chunks below are not checked again
        inputs = self.model.check_inputs(latents, text_conds["encoder_hidden_states"],
                                         text_conds.get("pooled_projections"),
                                         text_conds.get("encoder_attention_mask"))
        if self.common_noise and groups is None:
            groups = self.model.backbone.noise_groups(inputs.text)
        noise = self.draw_noise(tuple(inputs.latents.shape), groups, sample_ids)
        if u is None and self.ensemble_u is None:
            u = self.default_u("latents")
        batch = inputs.batch
        step = self.max_batch or batch
        chunks = []
        for start in range(0, batch, step):
            part = slice(start, min(start + step, batch))
            chunks.append(self._score_chunk(inputs if step >= batch else inputs.rows(part), noise[:, :, part], u))
        raw = chunks[0] if len(chunks) == 1 else mint.cat(chunks, dim=0)
        return raw * self.scale + self.offset

    def _score_chunk(self, inputs: RewardInputs, noise: np.ndarray, u) -> Tensor:
        total = None
        for draw in noise:                                       # (levels, b, C, H, W) per draw
            if self.ensemble_u is not None:
                r = self.model.reward_ensemble(inputs, us=self.ensemble_u, noise=draw, check_values=False)
            else:
                r = self.model.reward(inputs, u=u, noise=draw[0], check_values=False)
            total = r if total is None else total + r
        return total / len(noise) if len(noise) > 1 else total

    def score_latents(self, latents, prompt_embeds, pooled_prompt_embeds=None,
                      groups: Optional[Sequence[Any]] = None, u: Optional[float] = None,
                      encoder_attention_mask=None, sample_ids: Optional[Sequence[int]] = None) -> List[float]:
        """One float per sample: the scorer contract, from latents and prompt embeddings."""
        text_conds = {"encoder_hidden_states": prompt_embeds}
        if pooled_prompt_embeds is not None:
            text_conds["pooled_projections"] = pooled_prompt_embeds
        if encoder_attention_mask is not None:
            text_conds["encoder_attention_mask"] = encoder_attention_mask
        rewards = self.reward(latents, text_conds, u=u, groups=groups, sample_ids=sample_ids)
        return [float(v) for v in rewards.astype(ms.float32).asnumpy()[:, 0]]

    def __call__(self, images, prompts: Optional[Sequence[str]] = None, prompt_embeds=None,
                 pooled_prompt_embeds=None, sample_ids: Optional[Sequence[int]] = None) -> List[float]:
        """Flow-GRPO-MS's scorer call: images (PIL list, arrays in [0, 1], see ms_rm.scoring.images) and
        prompts, one float per image. Images are fitted to multiples of 16 pixels by the scorer's
        `size_policy` and encoded in groups of equal size (an image object given more than once, as
        a batch's fillers are, is encoded once); precomputed prompt embeddings may be
        passed instead of prompts; sample_ids: per-sample noise (see draw_noise)."""
        if self.encoder is None:
            raise ConfigError(
                f"{type(self).__name__} scores latents: pass encoder= (ms_rm.encoders.SD3Encoder, or "
                "MindOneSD3Encoder(pipeline) for a mindone pipeline) to score images, or call "
                "score_latents(latents, prompt_embeds, pooled_prompt_embeds) with what the trainer holds")
        items = split_batch(images)
        first: Dict[int, int] = {}
        source = [first.setdefault(id(item), i) for i, item in enumerate(items)]   # an object's first index
        pixels = preprocess(items, self.size_policy)
        if prompt_embeds is None or pooled_prompt_embeds is None:
            if prompts is None:
                raise InputError("prompts are required: Diffusion-RM scores an image against its prompt "
                                 "(or pass prompt_embeds and pooled_prompt_embeds)")
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if len(prompts) != len(pixels):
                raise InputError(f"got {len(pixels)} images and {len(prompts)} prompts: pass one prompt per image")
            prompt_embeds, pooled_prompt_embeds = self.encoder.encode_prompts(prompts)
        ehs = as_float_tensor(prompt_embeds, "prompt_embeds")
        pooled = as_float_tensor(pooled_prompt_embeds, "pooled_prompt_embeds")
        if ehs.shape[0] != len(pixels) or pooled.shape[0] != len(pixels):
            raise InputError(f"prompt embeddings hold {ehs.shape[0]} / {pooled.shape[0]} rows for {len(pixels)} images")
        groups = list(prompts) if self.common_noise and prompts is not None else None
        u = None if self.ensemble_u is not None else self.default_u("images")
        scores: List[float] = [0.0] * len(pixels)
        for indices in group_by_size(pixels).values():           # one encoder batch per image size
            distinct = [i for i in indices if source[i] == i]    # an image object given twice is encoded once
            latents = self.encoder.encode_pixels(np.stack([pixels[i] for i in distinct]))
            if len(distinct) < len(indices):
                position = {i: n for n, i in enumerate(distinct)}
                latents = _rows(as_float_tensor(latents, "latents"), [position[source[i]] for i in indices])
            values = self.score_latents(latents, _rows(ehs, indices), _rows(pooled, indices),
                                        groups=None if groups is None else [groups[i] for i in indices], u=u,
                                        sample_ids=None if sample_ids is None else [sample_ids[i] for i in indices])
            for i, value in zip(indices, values):
                scores[i] = value
        return scores


class DiffusionRMSD3Scorer(DiffusionRMScorer):
    """Diffusion-RM on an SD3 / SD3.5 backbone (the released DiNa-LRM)."""

    name = "diffusion-rm-sd3"
    family = "sd3"


class DiffusionRMFluxScorer(DiffusionRMScorer):
    """Diffusion-RM on a FLUX.1 backbone (its double-stream blocks)."""

    name = "diffusion-rm-flux"
    family = "flux"


class DiffusionRMZImageScorer(DiffusionRMScorer):
    """Diffusion-RM on a Z-Image backbone. Scores latents with Qwen3 caption features of variable
    length: `score_latents(latents, prompt_embeds)` with a list of (T_i, 2560) arrays, or padded
    (B, T, 2560) with `encoder_attention_mask=` (B, T); no pooled embedding."""

    name = "diffusion-rm-zimage"
    family = "zimage"

    def __call__(self, images, prompts: Optional[Sequence[str]] = None, prompt_embeds=None,
                 pooled_prompt_embeds=None, sample_ids=None) -> List[float]:
        raise ConfigError("the Z-Image scorer scores latents: ms_rm has no Z-Image VAE or Qwen3 text encoder, so "
                          "call score_latents(latents, prompt_embeds[, encoder_attention_mask=...]) with the "
                          "Z-Image pipeline's latents and caption features")


def _rows(tensor: Tensor, indices: List[int]) -> Tensor:
    """The rows `indices` of a tensor, gathered on the device (the tensor itself when that is all
    of them, in order)."""
    if indices == list(range(tensor.shape[0])):
        return tensor
    return take_rows(tensor, indices)


SCORERS: Dict[str, type] = {cls.name: cls for cls in (DiffusionRMSD3Scorer, DiffusionRMFluxScorer,
                                                       DiffusionRMZImageScorer, PickScoreScorer, CLIPScorer,
                                                       ImageRewardScorer, JpegCompressibilityScorer,
                                                       JpegIncompressibilityScorer, AestheticScorer, BLIPScoreScorer,
                                                       HPSv2Scorer)}
