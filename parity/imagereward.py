"""Parity of ImageReward: ms_rm.rewards.imagereward against the `image-reward` package's own model
(ms_rm_parity.imagereward_reference), on a tiny random model saved as the released ImageReward.pt
and converted by ms_rm. Compared, under the tolerance policy (torch fp32's own error against
float64): the image features, the prompt's [CLS] feature and the reward of preprocessed pixels;
the reward of raw pixels (B, 3, H, W) in [0, 1] through the ReFL transform (torch's antialiased
bicubic interpolate, center crop, normalise) and its gradient with respect to the pixels.
"""

from __future__ import annotations

import os
from typing import Dict, List

import numpy as np
import torch

REWARD_MODEL = "imagereward"          # the registry name (ms_rm.REWARD_MODELS) these cases cover
IMAGEREWARD_CASES = {"imagereward-tiny": "ImageReward (tiny ViT + BERT, random MLP) vs the image-reward package: "
                                         "image features, [CLS] feature, reward, ReFL pixel reward and its pixel "
                                         "gradient",
                     "imagereward-tiny-large-weights": "imagereward-tiny with every matrix, embedding and position "
                                                       "table 3x: GELU inputs beyond 10, attention logits beyond 40"}

RAW_SIZE = (48, 40)          # raw image size of the ReFL-transform stages (resized down to the model's size)


def tiny_inputs(config, seed: int, batch: int = 2):
    """Preprocessed pixels, raw pixels in [0, 1], token ids ([CLS] ... [SEP], padded) and their mask."""
    rng = np.random.default_rng(seed)
    s = config.vision.image_size
    pixels = rng.standard_normal((batch, 3, s, s)).astype(np.float32)
    raw = rng.uniform(0, 1, (batch, 3) + RAW_SIZE).astype(np.float32)
    length = config.max_length
    ids = np.zeros((batch, length), np.int64)
    mask = np.zeros((batch, length), np.int64)
    for b, n in enumerate(np.linspace(5, length, batch).astype(int)):
        ids[b, :n] = np.concatenate([[1], rng.integers(4, config.text.vocab_size, n - 2), [2]])
        mask[b, :n] = 1
    return pixels, raw, ids, mask


def torch_refl_transform(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's Resize(size, bicubic) (antialias=True) + CenterCrop(size) + Normalize on a float
    tensor, written with torch's interpolate (torchvision cannot be installed next to the CPU torch)."""
    from ms_rm.rewards.imagereward.config import PIXEL_MEAN, PIXEL_STD

    # torchvision's own size rules, written out here (not ms_rm's): Resize(size) makes the shorter
    # side `size` and the longer int(size * long / short); CenterCrop starts at int(round(excess / 2))
    height, width = pixels.shape[2], pixels.shape[3]
    short, long = (width, height) if width <= height else (height, width)
    h, w = (int(size * long / short), size) if width <= height else (size, int(size * long / short))
    x = torch.nn.functional.interpolate(pixels, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    x = x[:, :, top:top + size, left:left + size]
    mean = torch.tensor(PIXEL_MEAN, dtype=x.dtype).reshape(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=x.dtype).reshape(1, 3, 1, 1)
    return (x - mean) / std


def _torch_side(model, config, pixels, raw, ids, mask, dtype) -> Dict[str, np.ndarray]:
    from .imagereward_reference import reference_stages

    model = model.to(dtype)
    out = reference_stages(model, pixels, ids, mask, dtype)
    x = torch.from_numpy(raw).to(dtype).requires_grad_(True)
    reward = model.score_gard(torch.from_numpy(ids), torch.from_numpy(mask),
                              torch_refl_transform(x, config.vision.image_size))
    reward.sum().backward()
    out.update(pixel_reward=reward.detach().double().numpy(), pixel_grad=x.grad.double().numpy())
    return out


def stages(folder: str, mode: str, seed: int, matrix_scale: float = 1.0):
    """(ours, torch fp32, torch fp64) stages of the tiny case (`matrix_scale`: the large-weight one)."""
    import copy

    from ms_rm.rewards.imagereward import ImageReward, tiny_config

    from .imagereward_reference import build_reference, save_checkpoint

    config = tiny_config()
    reference = build_reference(config, seed, matrix_scale=matrix_scale)
    path = save_checkpoint(reference, os.path.join(folder, "ImageReward.pt"))
    converted = ImageReward.convert(path, os.path.join(folder, "converted"), config=config, progress=False)
    ours_model = ImageReward.from_pretrained(converted, mode=mode)
    pixels, raw, ids, mask = tiny_inputs(config, seed)
    ours = {k: v.asnumpy() for k, v in ours_model.stages(pixels, ids, mask).items()}
    reward, grad = ours_model.reward_and_pixel_grad(raw, ids, mask)
    ours.update(pixel_reward=reward.asnumpy(), pixel_grad=grad.asnumpy())
    torch32 = _torch_side(copy.deepcopy(reference), config, pixels, raw, ids, mask, torch.float32)
    torch64 = _torch_side(copy.deepcopy(reference), config, pixels, raw, ids, mask, torch.float64)
    return ours, torch32, torch64


def run_imagereward_case(name: str, modes: List[str], dtype: str, seed: int, ms_device: str, torch_device: str):
    import functools

    from .harness import measured_reports
    from .scales import MATRIX_SCALE

    scale = MATRIX_SCALE if name.endswith("-large-weights") else 1.0
    return measured_reports(name, IMAGEREWARD_CASES[name], modes, dtype, seed, ms_device, torch_device,
                            functools.partial(stages, matrix_scale=scale))
