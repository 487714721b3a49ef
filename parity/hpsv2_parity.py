"""Parity of HPSv2 (ms_rm.rewards.hpsv2, ms_rm.scoring.hpsv2) with the hpsv2 package's own code.

A tiny random open_clip ViT CLIP is built by the hpsv2 wheel's open_clip exactly as hpsv2's
img_score.initialize_model builds ViT-H-14 (create_model_and_transforms with its arguments:
light_augmentation=True, output_dict=True, ...; no pretrained weights), from a tiny model config
registered with add_model_config. Its state dict is saved in HPSv2's released layout
({'state_dict': ...}, torch.save), converted with `HPSv2.convert` and scored by HPSv2Scorer.

The reference computes what img_score.score computes, per image: preprocess_val(image), the
tokenizer of get_tokenizer(name), model(image, text) (normalised features), and the diagonal of
image_features @ text_features.T. Compared: the pixel values of PIL images of several sizes and
modes, the image and text features, the scores, and on the differentiable path (float pixels
through preprocess_val's tensor steps, ResizeMaxSize + normalise, autograd) the scores and their
gradient with respect to the pixels. Token ids are compared for equality. Two variants: "gelu"
(ViT-H-14's exact GELU) and "quick_gelu" (force_quick_gelu). Bounds: the tolerance policy's
(measured_stages: torch fp32 against float64).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Dict, List

import numpy as np
import torch

from .harness import Report, environment, measured_stages
from .hpsv2_reference import bpe_file, open_clip
from .text_reference import perturb_

REWARD_MODEL = "hpsv2"
HPSV2_CASES = {"hpsv2-tiny": "HPSv2 vs the hpsv2 package's open_clip + preprocess_val + tokenizer (converted from its "
                             "released .pt layout): pixel values, image / text features, scores, pixel gradient",
               "hpsv2-tiny-large-weights": "hpsv2-tiny with every matrix, embedding and position table 3x the "
                                           "builder's"}
PROMPTS = ["a red cube on a table", "Two   CATS &amp; a dog", "a photo of a dog on the blue sky " * 12,
           "café “naïve” 東京 123"]
IMAGE_SIZES = ((37, 53, "RGB"), (64, 40, "L"), (28, 28, "P"), (20, 33, "CMYK"))   # (H, W, mode)
PIXEL_BATCHES = {"down": (60, 45), "up": (20, 33)}
IMAGE_SIZE, PATCH = 28, 7
VARIANTS = ("gelu", "quick_gelu")


def tiny_model_config(variant: str = "gelu") -> dict:
    config = {"embed_dim": 24,
              "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 40, "head_width": 10, "patch_size": PATCH},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
    if variant == "quick_gelu":
        config["quick_gelu"] = True
    return config


def build_tiny(folder: str, variant: str, seed: int, matrix_scale: float = 1.0):
    """(model, preprocess_val, tokenizer, path of the .pt, path of the model config) of a random tiny
    open_clip CLIP built as hpsv2 builds its model, saved as HPSv2 releases it."""
    from .scales import scale_matrices_

    oc = open_clip()
    os.makedirs(folder, exist_ok=True)
    name = f"hpsv2-tiny-{variant}"
    config_path = os.path.join(folder, name + ".json")
    with open(config_path, "w") as f:
        json.dump(tiny_model_config(variant), f)
    oc.add_model_config(config_path)
    torch.manual_seed(seed)
    model, _, preprocess_val = oc.create_model_and_transforms(
        name, None, precision="amp", device="cpu", jit=False, force_quick_gelu=False, force_custom_text=False,
        force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None, image_std=None,
        light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False,
        with_region_predictor=False)
    model.eval()
    perturb_(model, seed)
    scale_matrices_(model, matrix_scale)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07) + 0.3)
    pt = os.path.join(folder, "HPS_v2_tiny.pt")
    torch.save({"state_dict": model.state_dict()}, pt)
    return model, preprocess_val, oc.get_tokenizer(name), pt, config_path


def images(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for h, w, mode in IMAGE_SIZES:
        rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out.append(rgb.convert(mode) if mode != "P" else rgb.convert("P", palette=Image.ADAPTIVE))
    return out


def pixel_batches(seed: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    return {tag: rng.uniform(0, 1, (2, 3, h, w)).astype(np.float32) for tag, (h, w) in PIXEL_BATCHES.items()}


def torch_stages(model, preprocess_val, tokenizer, pil_images, batches, dtype) -> Dict[str, np.ndarray]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)                  # ToTensor divides in the default float dtype
    try:
        model = model.to(dtype)
        pixel_values, image_features, text_features, scores = [], [], [], []
        with torch.no_grad():
            for image, prompt in zip(pil_images, PROMPTS):          # img_score.score, one image at a time
                pixels = preprocess_val(image).unsqueeze(0)
                text = tokenizer([prompt])
                outputs = model(pixels, text)
                img, txt = outputs["image_features"], outputs["text_features"]
                scores.append(torch.diagonal(img @ txt.T)[0])
                pixel_values.append(pixels[0]), image_features.append(img[0]), text_features.append(txt[0])
        stages = {"pixel_values": torch.stack(pixel_values), "image_features": torch.stack(image_features),
                  "text_features": torch.stack(text_features), "score": torch.stack(scores)}
        tensor_steps = preprocess_val.transforms[2:]            # after RGB and ToTensor: ResizeMaxSize, normalise
        for tag, array in batches.items():
            x = torch.tensor(array, dtype=dtype, requires_grad=True)
            pixels = torch.stack([_apply(tensor_steps, image) for image in x])
            text = tokenizer(PROMPTS[: x.shape[0]])
            outputs = model(pixels, text)
            score = (outputs["image_features"] * outputs["text_features"]).sum(-1)
            score.sum().backward()
            stages[f"pixels_{tag}_score"], stages[f"pixels_{tag}_grad"] = score.detach(), x.grad
        return {k: np.asarray(v.detach().numpy(), dtype=np.float64) for k, v in stages.items()}
    finally:
        torch.set_default_dtype(previous)


def _apply(steps, x):
    for step in steps:
        x = step(x)
    return x


def ms_stages(converted: str, bpe: str, mode: str, pil_images, batches) -> Dict[str, np.ndarray]:
    import mindspore as ms

    from ms_rm.rewards.hpsv2 import pixel_values
    from ms_rm.scoring.hpsv2 import HPSv2Scorer

    scorer = HPSv2Scorer(converted, tokenizer_path=bpe, mode=mode)
    values = pixel_values(scorer.unit_images(pil_images), scorer.size)
    stages = {"pixel_values": values, "image_features": scorer.model.encode_images(values).asnumpy(),
              "text_features": scorer.text_embeds(PROMPTS).asnumpy(), "score": np.array(scorer(pil_images, PROMPTS))}
    for tag, array in batches.items():
        prompts = PROMPTS[: array.shape[0]]
        x = ms.Tensor(array)
        score, grad = ms.value_and_grad(lambda p: scorer.score_pixels(p, prompts).sum(), grad_position=0)(x)
        stages[f"pixels_{tag}_score"] = scorer.score_pixels(x, prompts).asnumpy()
        stages[f"pixels_{tag}_grad"] = grad.asnumpy()
    return stages


def hpsv2_stages(folder: str, variant: str, mode: str, seed: int, matrix_scale: float = 1.0):
    """(ours, torch fp32, torch float64) stages of one tiny model built and converted in `folder`."""
    from ms_rm.rewards.hpsv2 import HPSv2

    model, preprocess_val, tokenizer, pt, config_path = build_tiny(folder, variant, seed, matrix_scale)
    converted = HPSv2.convert(pt, os.path.join(folder, "converted"), model_config=config_path, progress=False)
    bpe = bpe_file(os.path.join(folder, "bpe"))
    pil_images, batches = images(seed), pixel_batches(seed)
    torch32 = torch_stages(model, preprocess_val, tokenizer, pil_images, batches, torch.float32)
    torch64 = torch_stages(model, preprocess_val, tokenizer, pil_images, batches, torch.float64)
    return ms_stages(converted, bpe, mode, pil_images, batches), torch32, torch64


def run_hpsv2_case(name: str, modes: List[str], dtype: str, seed: int, ms_device: str, torch_device: str) -> List[Report]:
    """One report per mode and variant."""
    if dtype != "fp32":
        raise ValueError(f"the HPSv2 case compares fp32 only, not {dtype}")
    from .scales import MATRIX_SCALE

    scale = MATRIX_SCALE if name.endswith("-large-weights") else 1.0
    reports = []
    for mode in modes:
        for variant in VARIANTS:
            with tempfile.TemporaryDirectory() as folder:
                ours, torch32, torch64 = hpsv2_stages(folder, variant, mode, seed, scale)
            reports.append(Report(f"{name}-{variant}", HPSV2_CASES[name], mode, dtype, seed,
                                  measured_stages(ours, torch32, torch64),
                                  environment=environment(ms_device, torch_device)))
    return reports
