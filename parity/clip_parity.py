"""Parity of the CLIP scorers (ms_rm.rewards.clip, ms_rm.scoring.clip) with transformers' CLIPModel.

Two tiny random CLIPModels, saved with `save_pretrained` (safetensors) beside a CLIPTokenizer
(text_reference.build_clip_tokenizer) and a CLIPImageProcessor config, and loaded by ms_rm from
that folder:

* "openai": quick_gelu in both towers, the legacy text eos_token_id 2 (the pooled token is the
  highest id), the tokenizer padding with its end token, as OpenAI's CLIP folders;
* "laion": exact gelu, the real eos id, padding with "!", as PickScore's ViT-H/14.

Every parameter is random (the 1-D ones perturbed, logit_scale moved off its init). Compared,
per model: CLIPImageProcessor's pixel values of PIL images of odd sizes, the normalised image
and text embeddings, logits_per_image, the scores (cosine and exp(logit_scale) x cosine), and
on the differentiable path (float pixels, F.interpolate(bicubic, antialias=True), center crop,
normalise, get_image_features) the scores and their gradient with respect to the pixels for a
downscaled and an upscaled batch (torch autograd against MindSpore's grad). Bounds: the
tolerance policy's (ms_rm_parity.harness.measured_stages: torch fp32 against float64).
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .harness import Report, environment, measured_stages
from .text_reference import CLIP_EOS, build_clip_tokenizer, perturb_

REWARD_MODEL = "clip"                 # the registry name (ms_rm.REWARD_MODELS) these cases cover
CLIP_CASES = {"clip-tiny": "CLIP scorers (PickScore / CLIP score) vs transformers CLIPModel + CLIPImageProcessor: "
                           "pixel values, embeddings, logits, cosine and logit scores, score gradient w.r.t. pixels",
              "clip-tiny-large-weights": "clip-tiny with every matrix, embedding and position table 3x CLIPModel's "
                                         "init: GELU / QuickGELU inputs beyond 8, attention logits beyond 10"}
PROMPTS = ["a red cube on a table", "two cats", "a photo of a dog on the blue sky " * 12]
IMAGE_SIZES = ((37, 53), (64, 40), (28, 28))          # (H, W) of the PIL images: odd, portrait, exact
PIXEL_BATCHES = {"down": (60, 45), "up": (20, 33)}     # (H, W) of the float pixel batches
IMAGE_SIZE, PATCH = 28, 7
VARIANTS = {"openai": dict(act="quick_gelu", legacy_eos=True, pad=CLIP_EOS),
            "laion": dict(act="gelu", legacy_eos=False, pad="!")}


def write_tiny_clip(folder: str, variant: str, seed: int, matrix_scale: float = 1.0, reference_init: bool = False):
    """A random transformers CLIPModel with its tokenizer and image processor, saved in `folder`;
    (model in eval mode, tokenizer, image processor). Its matrices are CLIPModel's own init, the
    vectors perturbed; `matrix_scale`: every parameter of two or more dimensions that much larger
    (the large-weight case); `reference_init`: CLIPModel's init kept unperturbed (ms_rm_parity.scales)."""
    from .scales import scale_matrices_

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    settings = VARIANTS[variant]
    tokenizer = build_clip_tokenizer(folder, pad_token=settings["pad"])
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act=settings["act"],
                eos_token_id=2 if settings["legacy_eos"] else tokenizer.eos_token_id,
                bos_token_id=0 if settings["legacy_eos"] else tokenizer.bos_token_id, pad_token_id=1)
    vision = dict(hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act=settings["act"])
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    if not reference_init:
        perturb_(model, seed)
        scale_matrices_(model, matrix_scale)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / 0.07) + 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE)
    processor.save_pretrained(folder)
    return model, tokenizer, processor


def _images(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]


def _pixel_batches(seed: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    return {tag: rng.uniform(0, 1, (2, 3, h, w)).astype(np.float32) for tag, (h, w) in PIXEL_BATCHES.items()}


def _torch_pixel_scores(model, text_embeds, pixels, dtype, mean, std) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Differentiable path in torch: (cosine scores, their pixel gradient, logit-scaled scores)."""
    from transformers.image_transforms import center_crop, get_resize_output_image_size

    x = torch.tensor(pixels, dtype=dtype, requires_grad=True)
    h, w = pixels.shape[2:]
    # the sizes and the crop offset from transformers' own functions (CLIPImageProcessor's), not ms_rm's
    new_h, new_w = get_resize_output_image_size(np.zeros((h, w, 1)), IMAGE_SIZE, default_to_square=False,
                                                input_data_format="channels_last")
    where = np.stack(np.meshgrid(np.arange(new_h), np.arange(new_w), indexing="ij"), axis=-1)    # (h', w', 2)
    top, left = (int(v) for v in center_crop(where, (IMAGE_SIZE, IMAGE_SIZE), input_data_format="channels_last")[0, 0])
    resized = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    crop = resized[:, :, top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]
    normed = (crop - torch.tensor(mean, dtype=dtype).view(1, 3, 1, 1)) / torch.tensor(std, dtype=dtype).view(1, 3, 1, 1)
    embeds = model.get_image_features(pixel_values=normed)
    embeds = embeds / embeds.norm(dim=-1, keepdim=True)
    scores = (embeds * text_embeds).sum(-1)
    scores.sum().backward()
    logit = scores.detach() * model.logit_scale.exp().detach()
    return scores.detach().numpy(), x.grad.numpy(), logit.numpy()


def _torch_stages(model, tokenizer, processor, images, batches, dtype) -> Dict[str, np.ndarray]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)          # transformers builds the causal mask in the default dtype
    try:
        return _torch_run(model.to(dtype), tokenizer, processor, images, batches, dtype)
    finally:
        torch.set_default_dtype(previous)


def _torch_run(model, tokenizer, processor, images, batches, dtype) -> Dict[str, np.ndarray]:
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=pixel_values.to(dtype))
    stages = {"pixel_values": pixel_values.numpy(), "image_embeds": out.image_embeds.numpy(),
              "text_embeds": out.text_embeds.numpy(), "logits_per_image": out.logits_per_image.numpy(),
              "score_cosine": (out.image_embeds * out.text_embeds).sum(-1).numpy(),
              "score_logit": torch.diagonal(out.logits_per_image).numpy()}
    for tag, pixels in batches.items():
        text = out.text_embeds[: pixels.shape[0]].detach()
        scores, grad, logit = _torch_pixel_scores(model, text, pixels, dtype, processor.image_mean, processor.image_std)
        stages.update({f"pixels_{tag}_cosine": scores, f"pixels_{tag}_logit": logit, f"pixels_{tag}_grad": grad})
    return {k: np.asarray(v, dtype=np.float64) for k, v in stages.items()}


def _ms_stages(folder: str, mode: str, images, batches) -> Dict[str, np.ndarray]:
    import mindspore as ms

    from ms_rm.rewards.clip import pixel_values
    from ms_rm.scoring.clip import CLIPScorer

    cosine = CLIPScorer(folder, mode=mode)
    logit = CLIPScorer(model=cosine.model, processor_path=folder, scale="logit")
    values = pixel_values(cosine._uint8_images(images), cosine.processing)
    image_embeds = cosine.model.encode_images(values)
    text_embeds = cosine.text_embeds(PROMPTS)
    stages = {"pixel_values": values, "image_embeds": image_embeds.asnumpy(), "text_embeds": text_embeds.asnumpy(),
              "logits_per_image": cosine.model.run("logits_per_image", image_embeds, text_embeds).asnumpy(),
              "score_cosine": np.array(cosine(images, PROMPTS)), "score_logit": np.array(logit(images, PROMPTS))}
    for tag, pixels in batches.items():
        prompts = PROMPTS[: pixels.shape[0]]
        x = ms.Tensor(pixels)
        scores, grad = ms.value_and_grad(lambda p: cosine.score_pixels(p, prompts).sum(), grad_position=0)(x)
        stages.update({f"pixels_{tag}_cosine": cosine.score_pixels(x, prompts).asnumpy(),
                       f"pixels_{tag}_logit": logit.score_pixels(x, prompts).asnumpy(),
                       f"pixels_{tag}_grad": grad.asnumpy()})
    return stages


def clip_stages(folder: str, variant: str, mode: str, seed: int, matrix_scale: float = 1.0):
    """(ours, torch fp32, torch float64) stages of one tiny model written into `folder`."""
    model, tokenizer, processor = write_tiny_clip(folder, variant, seed, matrix_scale=matrix_scale)
    images, batches = _images(seed), _pixel_batches(seed)
    torch32 = _torch_stages(model, tokenizer, processor, images, batches, torch.float32)
    torch64 = _torch_stages(model, tokenizer, processor, images, batches, torch.float64)
    return _ms_stages(folder, mode, images, batches), torch32, torch64


def run_clip_case(name: str, modes: List[str], dtype: str, seed: int, ms_device: str, torch_device: str) -> List[Report]:
    """One report per mode and model variant."""
    if dtype != "fp32":
        raise ValueError(f"the CLIP case compares fp32 only, not {dtype}")
    from .scales import MATRIX_SCALE

    scale = MATRIX_SCALE if name.endswith("-large-weights") else 1.0
    reports = []
    for mode in modes:
        for variant in VARIANTS:
            with tempfile.TemporaryDirectory() as folder:
                ours, torch32, torch64 = clip_stages(os.path.join(folder, variant), variant, mode, seed, scale)
            reports.append(Report(f"{name}-{variant}", CLIP_CASES[name], mode, dtype, seed,
                                  measured_stages(ours, torch32, torch64),
                                  environment=environment(ms_device, torch_device)))
    return reports


# --- the real CLIP vocabulary, for tokenizer tests --------------------------------------------------

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"


OPEN_CLIP_DOWNLOAD = ("pip download --no-deps --only-binary :all: -d .deps/open-clip open-clip-torch==3.3.0")


def open_clip_folder() -> str:
    """Where the open-clip-torch wheel lies (MS_RM_OPEN_CLIP_WHEEL_DIR, else the checkout's .deps/open-clip:
    the README's install downloads it there)."""
    default = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), ".deps", "open-clip")
    return os.environ.get("MS_RM_OPEN_CLIP_WHEEL_DIR", default)


def open_clip_bpe(folder: str) -> str:
    """OpenAI CLIP's BPE file (bpe_simple_vocab_16e6.txt.gz) read out of the open-clip-torch wheel
    (open_clip_folder(), downloaded by the README's install, never installed: it would pull
    torchvision) into `folder`. open_clip itself is never imported."""
    import glob
    import zipfile

    wheels = glob.glob(os.path.join(open_clip_folder(), "open_clip_torch-3.3.0-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"{open_clip_folder()}: no open_clip_torch-3.3.0 wheel; run, in the checkout, "
                                f"{OPEN_CLIP_DOWNLOAD}")
    target = os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz")
    os.makedirs(folder, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as wheel:
        data = wheel.read(BPE_MEMBER)
    with open(target + ".tmp", "wb") as f:
        f.write(data)
    os.replace(target + ".tmp", target)
    return target


def write_clip_vocabulary(bpe_gz: str, folder: str) -> None:
    """vocab.json + merges.txt as transformers' CLIPTokenizer reads them, built from CLIP's BPE
    file the way CLIP's simple tokenizer builds its vocabulary: the 256 byte symbols, the same
    with `</w>`, one token per merge (the file's first 48,894 merges after its header line), then
    <|startoftext|> and <|endoftext|>: 49,408 tokens."""
    import gzip
    import json

    from .text_reference import CLIP_BOS, _bytes_to_unicode

    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
