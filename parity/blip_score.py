"""Parity of the BLIP score: ms_rm.rewards.blip_score against the image-reward package's own
`BLIPScore` (models/BLIPScore.py) on its own BLIP classes (VisionTransformer, med.BertModel,
BLIP_Pretrain), loaded through ms_rm_parity.imagereward_reference's shims.

A tiny random BLIP pretraining model is saved as BLIP's released `model_large.pth` is laid out
({"model": BLIP_Pretrain's state dict}, with the momentum encoders, queues, temperature, ITM head
and captioning decoder of the released file), converted by ms_rm, and loaded on the torch side as
the package's `load_score("BLIP")` loads it: a BLIPScore whose BLIP_Pretrain (ViT, text encoder
with cross-attention, the two projections) takes `state["model"]` with strict=False (here: and
no key of it missing). Shims (the package cannot run offline): BLIP_Pretrain.__init__ downloads
bert-base-uncased's tokenizer and hard-codes ViT-L, so the tiny model is assembled from the
package's classes with the config's sizes (and a med_config built from BLIP's, see
imagereward_reference.med_config); BLIPScore.score's tokenizer and PIL preprocessing are replaced,
for the `package_score` stage, by the case's token ids and preprocessed pixels (the preprocessing
is ImageReward's `_transform`, checked separately in tests/test_blip_score.py).

Compared, under the tolerance policy (torch fp32's own error against float64): the normalised
image and text features and the score of preprocessed pixels; the package's own `BLIPScore.score`
per sample; the score of raw pixels (B, 3, H, W) in [0, 1] through the ReFL transform (torch's
antialiased bicubic interpolate, center crop, normalise) and its gradient with respect to the pixels.
"""

from __future__ import annotations

import os
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

REWARD_MODEL = "blip-score"           # the registry name (ms_rm.REWARD_MODELS) these cases cover
BLIP_SCORE_CASES = {"blip-score-tiny": "BLIP score (tiny ViT + text-only BERT + projections) vs the image-reward "
                                       "package's BLIPScore on a model_large.pth-layout file: image and text "
                                       "features, score, the package's score(), ReFL pixel score and its pixel "
                                       "gradient",
                    "blip-score-tiny-large-weights": "blip-score-tiny with every matrix, embedding and position table "
                                                     "3x: GELU and attention logits at large inputs"}
EMBED_QUEUE = 16                      # the tiny file's queue length (BLIP's: 57600)


def _randomize(module: torch.nn.Module, seed: int, matrix_scale: float) -> None:
    """Every parameter drawn as ImageReward's builder draws them (weights.random_parameter by name,
    LayerNorm scales near 1), matrices x matrix_scale."""
    from ms_rm.core.weights import random_parameter

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 0:
                continue                      # the temperature: set by the caller
            value = torch.from_numpy(random_parameter(name, tuple(p.shape), seed))
            if p.ndim == 1 and "norm" in name.lower() and name.endswith(".weight"):
                value = value + 1.0
            if p.ndim >= 2:
                value = value * matrix_scale
            p.copy_(value)


def build_pretrain(config, seed: int = 0, matrix_scale: float = 1.0) -> torch.nn.Module:
    """BLIP's pretraining module as model_large.pth holds it, with `config`'s sizes and the package's
    classes: ViT, text encoder (with cross-attention), the two projections, their momentum copies,
    the ITM head, the captioning decoder (med.BertLMHeadModel), the queues and the temperature."""
    from .imagereward_reference import load_package, med_config

    pkg = load_package()
    torch.manual_seed(seed)
    v, t, e = config.vision, config.text, config.embed_dim
    blip = pkg.blip_pretrain.BLIP_Pretrain.__new__(pkg.blip_pretrain.BLIP_Pretrain)
    torch.nn.Module.__init__(blip)

    def vit():
        return pkg.vit.VisionTransformer(img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.width,
                                         depth=v.layers, num_heads=v.heads, mlp_ratio=v.mlp_ratio)

    blip.visual_encoder = vit()
    blip.text_encoder = pkg.med.BertModel(config=med_config(config), add_pooling_layer=False)
    blip.vision_proj = torch.nn.Linear(v.width, e)
    blip.text_proj = torch.nn.Linear(t.width, e)
    blip.itm_head = torch.nn.Linear(t.width, 2)
    blip.visual_encoder_m = vit()
    blip.vision_proj_m = torch.nn.Linear(v.width, e)
    blip.text_encoder_m = pkg.med.BertModel(config=med_config(config), add_pooling_layer=False)
    blip.text_proj_m = torch.nn.Linear(t.width, e)
    blip.register_buffer("image_queue", F.normalize(torch.randn(e, EMBED_QUEUE), dim=0))
    blip.register_buffer("text_queue", F.normalize(torch.randn(e, EMBED_QUEUE), dim=0))
    blip.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
    blip.temp = torch.nn.Parameter(0.07 * torch.ones([]))
    blip.text_decoder = pkg.med.BertLMHeadModel(config=med_config(config))
    _randomize(blip, seed, matrix_scale)
    with torch.no_grad():
        blip.temp.fill_(0.07)
    return blip.eval()


def save_checkpoint(pretrain: torch.nn.Module, path: str) -> str:
    """Saved as BLIP's released model_large.pth: {"model": state dict}."""
    torch.save({"model": pretrain.state_dict()}, path)
    return path


def load_reference(path: str, config) -> torch.nn.Module:
    """The package's BLIPScore, its BLIP_Pretrain (ViT, text encoder, vision_proj, text_proj, as the
    package's BLIP_Pretrain builds it) loaded from `path` as load_score("BLIP") loads it:
    load_state_dict(state["model"], strict=False); no key of the model may be missing."""
    from .imagereward_reference import load_package, med_config

    pkg = load_package()
    v, t = config.vision, config.text
    blip = pkg.blip_pretrain.BLIP_Pretrain.__new__(pkg.blip_pretrain.BLIP_Pretrain)
    torch.nn.Module.__init__(blip)
    blip.visual_encoder = pkg.vit.VisionTransformer(img_size=v.image_size, patch_size=v.patch_size,
                                                    embed_dim=v.width, depth=v.layers, num_heads=v.heads,
                                                    mlp_ratio=v.mlp_ratio)
    blip.text_encoder = pkg.med.BertModel(config=med_config(config), add_pooling_layer=False)
    blip.vision_proj = torch.nn.Linear(v.width, config.embed_dim)
    blip.text_proj = torch.nn.Linear(t.width, config.embed_dim)
    model = pkg.blip_score.BLIPScore.__new__(pkg.blip_score.BLIPScore)
    torch.nn.Module.__init__(model)
    model.device = "cpu"
    model.blip = blip
    state = torch.load(path, map_location="cpu", weights_only=True)
    result = model.blip.load_state_dict(state["model"], strict=False)
    if result.missing_keys:
        raise AssertionError(f"the package's BLIP_Pretrain lacks {result.missing_keys[:5]} in {path}")
    return model.eval()


def package_model() -> torch.nn.Module:
    """The package's full-size BLIPScore(med_config) with its real constructor, on torch's meta device
    (the tokenizer download replaced by nothing: the shapes do not need it)."""
    import json
    import tempfile

    from .imagereward_reference import MED_CONFIG, load_package

    pkg = load_package()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "med_config.json")
        with open(path, "w") as f:
            json.dump(MED_CONFIG, f)
        saved_tokenizer, saved_linspace = pkg.blip_pretrain.init_tokenizer, torch.linspace
        pkg.blip_pretrain.init_tokenizer = lambda: None
        torch.linspace = lambda *args, **kwargs: saved_linspace(*args, **dict(kwargs, device="cpu"))
        try:
            with torch.device("meta"):
                return pkg.blip_score.BLIPScore(med_config=path, device="meta")
        finally:
            pkg.blip_pretrain.init_tokenizer, torch.linspace = saved_tokenizer, saved_linspace


def features(model, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    """(image features, text features, score) as BLIPScore.score / inference_rank compute them, batched."""
    text_output = model.blip.text_encoder(ids, attention_mask=mask, mode='text')
    txt_feature = F.normalize(model.blip.text_proj(text_output.last_hidden_state[:, 0, :]))
    image_embeds = model.blip.visual_encoder(pixels)
    image_features = F.normalize(model.blip.vision_proj(image_embeds[:, 0, :]), dim=-1)
    return image_features, txt_feature, torch.sum(torch.mul(txt_feature, image_features), dim=1, keepdim=True)


class _Tokens(dict):
    """What BLIP's tokenizer(prompt, ..., return_tensors="pt") returns, for one prompt's given tokens."""

    def __init__(self, ids, mask):
        super().__init__(input_ids=ids, attention_mask=mask)
        self.input_ids, self.attention_mask = ids, mask

    def to(self, device):
        return self


def package_scores(model, image_path: str, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The package's own BLIPScore.score(prompt, image_path) per sample: its tokenizer and PIL
    preprocessing replaced by the sample's tokens and preprocessed pixels (the offline shims)."""
    out = []
    for b in range(pixels.shape[0]):
        model.blip.tokenizer = lambda prompt, **kwargs: _Tokens(ids[b:b + 1], mask[b:b + 1])
        model.preprocess = lambda image: pixels[b]
        out.append(model.score(f"prompt {b}", image_path))
    del model.blip.tokenizer, model.preprocess
    return np.asarray(out, np.float64).reshape(-1, 1)


def _torch_side(model, config, image_path, pixels, raw, ids, mask, dtype) -> Dict[str, np.ndarray]:
    from .imagereward import torch_refl_transform

    model = model.to(dtype)
    put = lambda a: torch.from_numpy(np.asarray(a)).to(dtype)
    t_ids, t_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    with torch.no_grad():
        image, text, score = features(model, put(pixels), t_ids, t_mask)
        package = package_scores(model, image_path, put(pixels), t_ids, t_mask)
    x = put(raw).requires_grad_(True)
    pixel_score = features(model, torch_refl_transform(x, config.vision.image_size), t_ids, t_mask)[2]
    pixel_score.sum().backward()
    return {k: np.asarray(v.detach().double().numpy() if torch.is_tensor(v) else v, np.float64) for k, v in
            {"image_features": image, "text_features": text, "score": score, "package_score": package,
             "pixel_score": pixel_score, "pixel_grad": x.grad}.items()}


def stages(folder: str, mode: str, seed: int, matrix_scale: float = 1.0):
    """(ours, torch fp32, torch fp64) stages of the tiny case (`matrix_scale`: the large-weight one)."""
    import copy

    from PIL import Image

    from ms_rm.rewards.blip_score import BLIPScore, tiny_config

    from .imagereward import tiny_inputs

    config = tiny_config()
    path = save_checkpoint(build_pretrain(config, seed, matrix_scale), os.path.join(folder, "model_large.pth"))
    reference = load_reference(path, config)
    converted = BLIPScore.convert(path, os.path.join(folder, "converted"), config=config, progress=False)
    ours_model = BLIPScore.from_pretrained(converted, mode=mode)
    pixels, raw, ids, mask = tiny_inputs(config, seed)
    ours = {k: v.asnumpy() for k, v in ours_model.stages(pixels, ids, mask).items()}
    ours["package_score"] = ours["score"]
    reward, grad = ours_model.reward_and_pixel_grad(raw, ids, mask)
    ours.update(pixel_score=reward.asnumpy(), pixel_grad=grad.asnumpy())
    image_path = os.path.join(folder, "image.png")              # opened by BLIPScore.score, then replaced
    Image.new("RGB", (8, 8)).save(image_path)
    torch32 = _torch_side(copy.deepcopy(reference), config, image_path, pixels, raw, ids, mask, torch.float32)
    torch64 = _torch_side(copy.deepcopy(reference), config, image_path, pixels, raw, ids, mask, torch.float64)
    return ours, torch32, torch64


def run_blip_score_case(name: str, modes: List[str], dtype: str, seed: int, ms_device: str, torch_device: str):
    import functools

    from .harness import measured_reports
    from .scales import MATRIX_SCALE

    scale = MATRIX_SCALE if name.endswith("-large-weights") else 1.0
    return measured_reports(name, BLIP_SCORE_CASES[name], modes, dtype, seed, ms_device, torch_device,
                            functools.partial(stages, matrix_scale=scale))
