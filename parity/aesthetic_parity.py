"""Parity of the aesthetic predictor (ms_rm.rewards.aesthetic, ms_rm.scoring.aesthetic) with its references.

The reference side, per tiny model:
* the tower: transformers' CLIPModel (a tiny random one, clip_parity.write_tiny_clip, saved with
  save_pretrained beside its CLIPImageProcessor config), `get_image_features`;
* the MLP: the image-reward package's own `MLP` class (ImageReward/models/AestheticScore.py, the
  improved-aesthetic-predictor's layers), built with input_size = the tiny CLIP's projection_dim
  and torch's own initialisation, saved with torch.save as its state dict: the released `.pth`'s
  key layout (layers.0, .2, .4, .6, .7). AestheticScore.py imports OpenAI's `clip` package at its
  top (not installable here: it pulls torchvision); a stand-in `clip` module is in sys.modules
  only while the file loads, and nothing of it is called (the MLP class does not use it);
* the formula: Flow-GRPO-MS's scorer (CLIPProcessor's pixel values, get_image_features, divided
  by the L2 norm, the MLP).

ms_rm converts the `.pth` + the CLIP folder (Aesthetic.convert) and loads the converted folder.
Compared: CLIPImageProcessor's pixel values of PIL images of several sizes and modes (RGB, L,
RGBA; bit for bit), the image features, the unit features, the scores, and on the
differentiable path (float pixels, F.interpolate(bicubic, antialias=True), transformers' crop,
normalise) the scores and their pixel gradient for a downscaled and an upscaled batch. Bounds:
the tolerance policy's (ms_rm_parity.harness.measured_stages: torch fp32 against float64).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import types
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from .harness import Report, environment, measured_stages

REWARD_MODEL = "aesthetic"            # the registry name (ms_rm.REWARD_MODELS) these cases cover
AESTHETIC_CASES = {
    "aesthetic-tiny": "aesthetic predictor vs transformers CLIPModel + image-reward's AestheticScore MLP "
                      "(Flow-GRPO-MS's formula): pixel values (RGB / L / RGBA), features, scores, pixel gradient",
    "aesthetic-tiny-large-weights": "aesthetic-tiny with every CLIP and MLP matrix 3x its reference's init",
}
IMAGES = (((37, 53), "RGB"), ((64, 40), "L"), ((28, 28), "RGBA"), ((30, 90), "RGB"))   # ((H, W), mode)
PIXEL_BATCHES = {"down": (60, 45), "up": (20, 33)}
VARIANT = "openai"                    # quick_gelu, as OpenAI's ViT-L/14


def load_aesthetic_module() -> types.ModuleType:
    """image-reward's ImageReward/models/AestheticScore.py, loaded from the package folder
    (ms_rm_parity.imagereward_reference.packages_folder) with a stand-in `clip` while it loads."""
    from .imagereward_reference import _package_dir

    path = os.path.join(_package_dir("ImageReward"), "models", "AestheticScore.py")
    saved = sys.modules.get("clip")
    sys.modules["clip"] = types.ModuleType("clip")          # OpenAI CLIP: imported at the top, unused by MLP
    try:
        spec = importlib.util.spec_from_file_location("ms_rm_parity_aesthetic_score", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("clip", None)
        else:
            sys.modules["clip"] = saved
    return module


def write_tiny_aesthetic(folder: str, seed: int, matrix_scale: float = 1.0):
    """(CLIP folder, .pth path, torch CLIPModel, the package's MLP, CLIPImageProcessor), written in `folder`."""
    from .clip_parity import write_tiny_clip
    from .scales import scale_matrices_

    clip_folder, pth = os.path.join(folder, "clip"), os.path.join(folder, "aesthetic.pth")
    model, _, processor = write_tiny_clip(clip_folder, VARIANT, seed, matrix_scale=matrix_scale)
    torch.manual_seed(seed + 7)
    mlp = load_aesthetic_module().MLP(model.config.projection_dim).eval()      # torch's own init
    scale_matrices_(mlp, matrix_scale)
    torch.save(mlp.state_dict(), pth)
    return clip_folder, pth, model, mlp, processor


def sample_images(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for (h, w), mode in IMAGES:
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        array = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        out.append(Image.fromarray(array[..., 0] if channels == 1 else array, mode=mode))
    return out


def _pixel_batches(seed: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    return {tag: rng.uniform(0, 1, (2, 3, h, w)).astype(np.float32) for tag, (h, w) in PIXEL_BATCHES.items()}


def _torch_score(model, mlp, pixel_values):
    features = model.get_image_features(pixel_values=pixel_values)
    unit = features / torch.linalg.vector_norm(features, dim=-1, keepdim=True)   # Flow-GRPO-MS's division
    return features, unit, mlp(unit)[:, 0]


def _torch_pixel_scores(model, mlp, pixels, dtype, processor):
    from transformers.image_transforms import center_crop, get_resize_output_image_size

    size = processor.crop_size["height"]
    x = torch.tensor(pixels, dtype=dtype, requires_grad=True)
    h, w = pixels.shape[2:]
    new_h, new_w = get_resize_output_image_size(np.zeros((h, w, 1)), processor.size["shortest_edge"],
                                                default_to_square=False, input_data_format="channels_last")
    where = np.stack(np.meshgrid(np.arange(new_h), np.arange(new_w), indexing="ij"), axis=-1)
    top, left = (int(v) for v in center_crop(where, (size, size), input_data_format="channels_last")[0, 0])
    resized = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    crop = resized[:, :, top:top + size, left:left + size]
    mean = torch.tensor(processor.image_mean, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=dtype).view(1, 3, 1, 1)
    scores = _torch_score(model, mlp, (crop - mean) / std)[-1]
    scores.sum().backward()
    return scores.detach().numpy(), x.grad.numpy()


def _torch_stages(model, mlp, processor, images, batches, dtype) -> Dict[str, np.ndarray]:
    model, mlp = model.to(dtype), mlp.to(dtype)
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features, unit, scores = _torch_score(model, mlp, pixel_values.to(dtype))
    stages = {"pixel_values": pixel_values.numpy(), "image_features": features.numpy(),
              "unit_features": unit.numpy(), "score": scores.numpy()}
    for tag, pixels in batches.items():
        scores, grad = _torch_pixel_scores(model, mlp, pixels, dtype, processor)
        stages.update({f"pixels_{tag}_score": scores, f"pixels_{tag}_grad": grad})
    return {k: np.asarray(v, dtype=np.float64) for k, v in stages.items()}


def _ms_stages(converted: str, mode: str, images, batches) -> Dict[str, np.ndarray]:
    import mindspore as ms

    from ms_rm.scoring.aesthetic import AestheticScorer

    scorer = AestheticScorer(converted, mode=mode)
    values = scorer.preprocess(images)
    parts = scorer.model.stages(values)
    stages = {"pixel_values": values, "image_features": parts["image_features"].asnumpy(),
              "unit_features": parts["unit_features"].asnumpy(), "score": np.array(scorer(images))}
    for tag, pixels in batches.items():
        x = ms.Tensor(pixels)
        scores, grad = ms.value_and_grad(lambda p: scorer.score_pixels(p).sum(), grad_position=0)(x)
        stages.update({f"pixels_{tag}_score": scorer.score_pixels(x).asnumpy(), f"pixels_{tag}_grad": grad.asnumpy()})
    return stages


def aesthetic_stages(folder: str, mode: str, seed: int, matrix_scale: float = 1.0):
    """(ours, torch fp32, torch float64) stages of one tiny model written and converted in `folder`."""
    from ms_rm.rewards.aesthetic import Aesthetic

    clip_folder, pth, model, mlp, processor = write_tiny_aesthetic(folder, seed, matrix_scale)
    converted = Aesthetic.convert(pth, clip_folder, os.path.join(folder, "converted"), progress=False)
    images, batches = sample_images(seed), _pixel_batches(seed)
    torch32 = _torch_stages(model, mlp, processor, images, batches, torch.float32)
    torch64 = _torch_stages(model, mlp, processor, images, batches, torch.float64)
    return _ms_stages(converted, mode, images, batches), torch32, torch64


def run_aesthetic_case(name: str, modes: List[str], dtype: str, seed: int, ms_device: str,
                       torch_device: str) -> List[Report]:
    """One report per mode."""
    if dtype != "fp32":
        raise ValueError(f"the aesthetic case compares fp32 only, not {dtype}")
    from .scales import MATRIX_SCALE

    scale = MATRIX_SCALE if name.endswith("-large-weights") else 1.0
    reports = []
    for mode in modes:
        with tempfile.TemporaryDirectory() as folder:
            ours, torch32, torch64 = aesthetic_stages(folder, mode, seed, scale)
        reports.append(Report(name, AESTHETIC_CASES[name], mode, dtype, seed, measured_stages(ours, torch32, torch64),
                              environment=environment(ms_device, torch_device)))
    return reports
