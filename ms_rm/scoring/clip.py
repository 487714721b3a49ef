"""CLIP scorers: PickScore and CLIP score, Flow-GRPO-MS's `scorer(images, prompts) -> list[float]`.

Both score a (image, prompt) pair by the similarity of CLIP's normalised image and text
embeddings; they differ only in the checkpoint they are meant for (PickScore: the ViT-H/14
CLIPModel fine-tuned on Pick-a-Pic; CLIP score: any CLIPModel, e.g. OpenAI's ViT-L/14).

* scale="cosine" (default): the cosine of the two embeddings, what Flow-GRPO-MS's PickScore
  scorer and this project's sources optimise;
* scale="logit": exp(logit_scale) x cosine, the original PickScore (about 21 for a good match
  with PickScore's logit_scale of 100).

`scorer(images, prompts)` preprocesses as CLIPImageProcessor (PIL's bicubic resize of the
uint8 image; float images are rounded to uint8 first, as Flow-GRPO-MS does) and has no gradient.
`scorer.score_pixels(pixels, prompts)` takes a MindSpore float tensor (B, 3, H, W) in [0, 1]
(a generator's decoded images) and returns the scores as a tensor that gradients flow through
back to the pixels; its resize is torch's F.interpolate(bicubic, antialias=True) on the floats
(see ms_rm.rewards.clip.preprocess), not PIL on rounded values, so its scores differ slightly
from `scorer(...)`'s on the same image.
"""

from __future__ import annotations

import logging
import os
from typing import Any, List, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint

from ..core.config import is_int
from ..core.errors import ConfigError, InputError
from ..core.inputs import pixel_batch
from ..rewards.clip import (CLIPModel, load_clip_model, load_image_processing, load_tokenizer, pixel_values,
                            resize_matrices, tokenize)
from ..rewards.clip.config import PREPROCESSOR_FILE
from .images import split_batch, to_unit_rgb

logger = logging.getLogger(__name__)

SCALES = ("cosine", "logit")
CLIP_SIZE_POLICIES = ("resize-crop", "error")


def _preprocessor_folder(processor_path: Optional[str], model_path: Optional[str]) -> str:
    """The first of the folders given that holds preprocessor_config.json; else the first given
    (load_image_processing then names it in its error)."""
    folders = [f for f in (processor_path, model_path) if f is not None]
    return next((f for f in folders if os.path.isfile(os.path.join(f, PREPROCESSOR_FILE))), folders[0])


class CLIPScorer:
    """A CLIPModel folder as a scorer of (image, prompt) pairs.

    model_path: a Hugging Face CLIPModel folder (config.json + model.safetensors), or pass
        `model=` (a loaded ms_rm.rewards.clip.CLIPModel) with the processor's folders.
    processor_path: the folder CLIPProcessor.save_pretrained writes, with the tokenizer
        (vocab.json, merges.txt) and preprocessor_config.json (default: model_path). PickScore's
        weights and its processor come from two Hugging Face repositories: pass both folders.
    tokenizer_path / image_processor_path: the two halves in folders of their own, as
        CLIPTokenizer.save_pretrained and CLIPImageProcessor.save_pretrained write them; each
        takes the place of processor_path for its half. The tokenizer is read from the first of
        tokenizer_path, processor_path, model_path given; preprocessor_config.json from
        image_processor_path, else from the first of processor_path, model_path that holds one.
        None of them holding it is a ConfigError (no silent default preprocessing).
    scale: "cosine" (default) or "logit" (exp(logit_scale) x cosine).
    size_policy: "resize-crop" (CLIPImageProcessor's: shortest edge to the crop size, center
        crop; default) or "error" (refuse images not already at the crop size).
    max_batch: split larger batches into chunks of this size (None: never split).
    """

    name = "clipscore"
    input_kind = "pixels"

    def __init__(self, model_path: Optional[str] = None, *, processor_path: Optional[str] = None,
                 tokenizer_path: Optional[str] = None, image_processor_path: Optional[str] = None,
                 model: Optional[CLIPModel] = None, scale: str = "cosine", size_policy: str = "resize-crop",
                 max_batch: Optional[int] = None, mode: str = "graph"):
        if (model_path is None) == (model is None):
            raise ConfigError("pass exactly one of model_path (a Hugging Face CLIPModel folder) or model")
        if model is not None and processor_path is None and (tokenizer_path is None or image_processor_path is None):
            raise ConfigError("with model=, pass processor_path (the folder with vocab.json, merges.txt and "
                              "preprocessor_config.json), or tokenizer_path and image_processor_path")
        if scale not in SCALES:
            raise ConfigError(f"scale must be one of {SCALES}, got {scale!r}")
        if size_policy not in CLIP_SIZE_POLICIES:
            raise ConfigError(f"size_policy must be one of {CLIP_SIZE_POLICIES} for a CLIP scorer, got {size_policy!r}")
        if max_batch is not None and not is_int(max_batch, 1):
            raise ConfigError(f"max_batch must be a positive integer or None, got {max_batch!r}")
        for path, what in ((model_path, "model_path"), (processor_path, "processor_path"),
                           (tokenizer_path, "tokenizer_path"), (image_processor_path, "image_processor_path")):
            if path is not None and not os.path.isdir(path):
                raise ConfigError(f"{path}: {what} is not a folder")
        self.tokenizer = load_tokenizer(tokenizer_path or processor_path or model_path)
        self.model = model if model is not None else load_clip_model(model_path, mode=mode)
        folder = image_processor_path or _preprocessor_folder(processor_path, model_path)
        self.processing = load_image_processing(folder, self.model.config.vision.image_size)
        logger.info("CLIP image preprocessing from %s", os.path.join(folder, PREPROCESSOR_FILE))
        self.scale, self.size_policy, self.max_batch = scale, size_policy, max_batch
        self._matrices = {}                     # (H, W) -> the resize tensors of score_pixels

    # --- inputs ------------------------------------------------------------------------------
    def _prompts(self, prompts, batch: int) -> List[str]:
        if prompts is None:
            raise InputError(f"{self.name} scores an image against its prompt: pass prompts (one per image)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise InputError("prompts is empty: pass one prompt per image")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise InputError(f"prompts[{bad[0]}] is a {type(prompts[bad[0]]).__name__}, not a string")
        if len(prompts) != batch:
            raise InputError(f"got {batch} images and {len(prompts)} prompts: pass one prompt per image")
        return prompts

    def _uint8_images(self, images) -> List[np.ndarray]:
        """Images as uint8 (H, W, 3): PIL (converted to RGB), uint8 arrays, floats in [0, 1] rounded."""
        items = split_batch(images)
        if not items:
            raise InputError("images is empty")
        out = []
        for i, image in enumerate(items):
            mode = getattr(image, "mode", "RGB")
            if mode != "RGB" and not self.processing.do_convert_rgb:
                raise InputError(f"images[{i}] is a {mode} image and the preprocessor config sets "
                                 "do_convert_rgb=false: convert it to RGB first")
            unit = to_unit_rgb(image, i)                                   # (3, H, W) in [0, 1]
            out.append(np.round(unit.transpose(1, 2, 0) * 255).astype(np.uint8))
            if self.size_policy == "error" and out[-1].shape[:2] != self.processing.crop_size:
                raise InputError(f"images[{i}] is {out[-1].shape[0]}x{out[-1].shape[1]} pixels; with size_policy "
                                 f"'error' images must be {self.processing.crop_size[0]}x"
                                 f"{self.processing.crop_size[1]} (or use 'resize-crop')")
        return out

    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        """(B, P) normalised text embeddings of the prompts."""
        ids = tokenize(self.tokenizer, list(prompts), self.model.config.text.max_position_embeddings)
        return self.model.encode_text(ids)

    def _chunks(self, batch: int):
        step = self.max_batch or batch
        return [slice(s, min(s + step, batch)) for s in range(0, batch, step)]

    def _scores(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        cosine = mint.sum(image_embeds * text_embeds, dim=-1)                     # (B,)
        return cosine * self.model.run("scale") if self.scale == "logit" else cosine

    # --- scoring -------------------------------------------------------------------------------
    def __call__(self, images: Any, prompts: Optional[Sequence[str]] = None) -> List[float]:
        """One float per (image, prompt): CLIPImageProcessor's preprocessing, no gradient."""
        images = self._uint8_images(images)
        prompts = self._prompts(prompts, len(images))
        scores: List[float] = []
        for part in self._chunks(len(images)):
            image_embeds = self.model.encode_images(pixel_values(images[part], self.processing))
            values = self._scores(image_embeds, self.text_embeds(prompts[part]))
            scores += [float(v) for v in values.asnumpy()]
        return scores

    def score_pixels(self, pixels: Any, prompts: Sequence[str]) -> Tensor:
        """(B,) scores of float pixels (B, 3, H, W) in [0, 1], differentiable with respect to them:
        `ms.grad(lambda x: scorer.score_pixels(x, prompts).sum())(pixels)`."""
        pixels = pixel_batch(pixels)
        prompts = self._prompts(prompts, pixels.shape[0])
        height, width = pixels.shape[2:]
        if self.size_policy == "error" and (height, width) != self.processing.crop_size:
            raise InputError(f"pixels are {height}x{width}; with size_policy 'error' they must be "
                             f"{self.processing.crop_size[0]}x{self.processing.crop_size[1]}")
        key = (height, width)
        if key not in self._matrices:
            rows, cols_t = resize_matrices(height, width, self.processing)
            self._matrices[key] = (Tensor(rows), Tensor(cols_t), Tensor(np.float32(self.processing.mean)),
                                   Tensor(np.float32(self.processing.std)))
        pixels = pixels.astype(ms.float32)
        chunks = []
        for part in self._chunks(pixels.shape[0]):
            image_embeds = self.model.run("unit_pixel_embeds", pixels[part], *self._matrices[key])
            chunks.append(self._scores(image_embeds, self.text_embeds(prompts[part])))
        return chunks[0] if len(chunks) == 1 else mint.cat(chunks, dim=0)


class PickScoreScorer(CLIPScorer):
    """PickScore (yuvalkirstain/PickScore_v1, a ViT-H/14 CLIPModel; its processor: the folder of
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K). Cosine by default; scale="logit" is the original's."""

    name = "pickscore"
