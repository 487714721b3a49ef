"""Encoders that turn images and prompts into what the reward model reads.

A scorer called with images (`scorer(images, prompts)`, `ms-rm score-images`) needs an encoder:
an object with

    encode_pixels(pixels: np.ndarray (B, 3, H, W) in [-1, 1]) -> latents (B, 16, H/8, W/8)
        in the reward model's space, (z - shift_factor) * scaling_factor;
    encode_prompts(prompts: list[str]) -> (prompt_embeds (B, 77 + T, 4096), pooled (B, 2048)).

The scorer does the image preprocessing and the grouping by size (ms_rm.scoring.images) itself, so an
encoder only ever sees a batch of one size. Two encoders are provided:

* `SD3Encoder`: ms_rm's own VAE encoder and SD3's three text encoders, from diffusers folders;
  runs on the CPU and on Ascend.
* `MindOneSD3Encoder`: the components of a mindone `StableDiffusion3Pipeline` that a Flow-GRPO-MS
  trainer already holds. mindone's AutoencoderKL has no CPU kernels (Conv2DExt), so this one
  needs Ascend for images; its prompt encoding is the pipeline's own `encode_prompt`.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint

from ..core.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_MAX_SEQUENCE_LENGTH = 128    # T5 tokens, as the released reward model encodes prompts


class SD3Encoder:
    """ms_rm's SD3 VAE encoder + SD3 prompt encoding (CLIP-L, CLIP-G, T5).

    sample: encode to the posterior's mode (False, the default: deterministic) or draw from it
        (True), with `seed` for reproducible draws. The reference samples (`latent_dist.sample()`).
    prompt_encoder: an SD3PromptEncoder, or None for images only (prompts then come as embeddings,
        as `ms-rm score-images` passes them: ms_rm.scoring.runs.PromptTable).
    vae_batch_size: images encoded at a time (default 1: on the CPU the VAE's activations dominate
        the memory at large sizes (docs/measurements.md), and batching gains no speed there).
    """

    def __init__(self, vae, prompt_encoder, sample: bool = False, seed: Optional[int] = None,
                 vae_batch_size: int = 1):
        if isinstance(vae_batch_size, bool) or not isinstance(vae_batch_size, int) or vae_batch_size < 1:
            raise ConfigError(f"vae_batch_size must be a positive integer, got {vae_batch_size!r}")
        self.vae, self.prompt_encoder = vae, prompt_encoder
        self.sample, self.seed, self.vae_batch_size = sample, seed, vae_batch_size

    @classmethod
    def from_pretrained(cls, vae: str, text_encoders: Optional[str] = None,
                        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, use_t5: bool = True,
                        joint_attention_dim: int = 4096, dtype: ms.Type = ms.float32, mode: str = "graph",
                        sample: bool = False, seed: Optional[int] = None) -> "SD3Encoder":
        """vae: a diffusers `vae/` folder (or the pipeline folder holding it); text_encoders: the
        SD3 pipeline folder holding text_encoder, text_encoder_2, text_encoder_3 and the tokenizers
        (default: the parent of `vae` when that is a `vae/` folder)."""
        from .sd3_prompts import SD3PromptEncoder
        from ..vae.encoder import load_vae_encoder

        return cls(load_vae_encoder(vae, dtype=dtype, mode=mode),
                   SD3PromptEncoder.from_pretrained(text_encoder_folder(vae, text_encoders),
                                                    max_sequence_length=max_sequence_length,
                                                    joint_attention_dim=joint_attention_dim, dtype=dtype,
                                                    use_t5=use_t5),
                   sample=sample, seed=seed)

    def encode_pixels(self, pixels: np.ndarray) -> Tensor:
        """Latents of pixels (B, 3, H, W), vae_batch_size images at a time; a posterior draw uses
        the noise one call for the whole batch would draw."""
        count, step = pixels.shape[0], self.vae_batch_size
        if count <= step:
            return self.vae.encode(pixels, sample=self.sample, seed=self.seed)
        noise = self.vae.draw_noise(self.vae.latent_shape(pixels.shape), self.seed) if self.sample else None
        parts = [self.vae.encode(pixels[i:i + step], sample=self.sample, noise=None if noise is None else noise[i:i + step])
                 for i in range(0, count, step)]
        return mint.cat(parts, dim=0)                                        # (B, latent, H/8, W/8)

    def encode_prompts(self, prompts: Sequence[str]) -> Tuple[Tensor, Tensor]:
        if self.prompt_encoder is None:
            raise ConfigError("this SD3Encoder has no text encoders (prompt_encoder=None): pass prompt_embeds and "
                              "pooled_prompt_embeds with the images, or build it with SD3Encoder.from_pretrained")
        return self.prompt_encoder.encode(list(prompts))


def text_encoder_folder(vae: str, text_encoders: Optional[str] = None) -> str:
    """The SD3 pipeline folder of the text encoders: `text_encoders` if given, else the parent of a
    `vae/` folder, or `vae` itself when it is the pipeline folder."""
    if text_encoders is not None:
        return text_encoders
    if os.path.basename(os.path.abspath(vae)) == "vae":
        return os.path.dirname(os.path.abspath(vae))
    if os.path.isdir(os.path.join(vae, "text_encoder")):
        return vae
    raise ConfigError(f"{vae}: pass text_encoders= (the SD3 pipeline folder holding text_encoder, "
                      "text_encoder_2, text_encoder_3 and the tokenizers)")


class MindOneSD3Encoder:
    """The VAE and text encoders of a mindone `StableDiffusion3Pipeline`, as a scorer's encoder.

    Needs Ascend for images (mindone's AutoencoderKL does not run on the CPU).
    """

    def __init__(self, pipeline, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, sample: bool = False,
                 seed: Optional[int] = None):
        missing = [name for name in ("vae", "encode_prompt") if not hasattr(pipeline, name)]
        if missing:
            raise ConfigError(f"MindOneSD3Encoder needs a mindone StableDiffusion3Pipeline; the object given "
                              f"({type(pipeline).__name__}) has no {missing}")
        self.pipeline, self.max_sequence_length = pipeline, max_sequence_length
        self.sample, self.seed = sample, seed

    def encode_pixels(self, pixels: np.ndarray) -> Tensor:
        vae = self.pipeline.vae
        moments = vae.encode(Tensor(pixels).astype(vae.dtype))[0]           # (B, 32, H/8, W/8)
        if self.sample:
            z = vae.diag_gauss_dist.sample(moments, generator=np.random.default_rng(self.seed))
        else:
            z = vae.diag_gauss_dist.mode(moments)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    def encode_prompts(self, prompts: Sequence[str]) -> Tuple[Tensor, Tensor]:
        prompts = list(prompts)
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts, prompts, prompts, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return embeds, pooled
