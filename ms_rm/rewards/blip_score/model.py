"""The BLIP score (the image-reward package's `BLIPScore` baseline): the cosine of BLIP's
contrastive image and text features.

    text = BERT(prompt tokens), text-only (mode='text': no cross-attention)   (B, L, D)
    t = normalize(text_proj(text[:, 0]))                                        (B, P)
    image = ViT(normalised pixels)                                              (B, N, E)
    v = normalize(vision_proj(image[:, 0]))                                     (B, P)
    score = sum(t * v)                                                          (B, 1)

as `BLIPScore.score` / `inference_rank` compute it (normalize: F.normalize, x / max(|x|, 1e-12);
no scale, mean or std). The towers are ImageReward's (ms_rm.rewards.imagereward: vit.py, bert.py,
the text encoder built without its cross-attention); so are the preprocessing (the same
Resize(224, bicubic) + CenterCrop + CLIP mean / std), the tokenizer (BLIP's BertTokenizer, 35
tokens) and every host-side call: BLIPScore subclasses ImageReward, replacing its parameters and
its `construct`. So `reward(pixels, ids, mask)`, `reward_of_pixels` / `forward_pixels` (pixels in
[0, 1], differentiable: ReFL, search), `reward_and_pixel_grad` and `prepare*` work as ImageReward's.
"""

from __future__ import annotations

from typing import Dict

import mindspore as ms
from mindspore import Tensor, mint

from ...core import ops
from ...core.compiled import CompiledCell
from ...core.layers import Linear
from ..imagereward.bert import TextEncoder
from ..imagereward.model import ImageReward
from ..imagereward.vit import VisionTransformer
from . import conversion
from .config import FORMAT_NAME, BLIPScoreConfig

EPS = 1e-12                       # F.normalize's


def unit(x: Tensor) -> Tensor:
    """F.normalize(x, dim=-1): x / max(||x||_2, 1e-12)."""
    norm = mint.sqrt(mint.sum(x * x, dim=-1, keepdim=True))
    return x / ops.expand(mint.clamp(norm, min=EPS), x)


class BLIPScore(ImageReward):
    """Build it with `BLIPScore.from_pretrained(dir)` (a folder written by `ms-rm convert --reward
    blip-score`) or `BLIPScore(config)` then `load_state_dict` / `randomize`."""

    name = "blip-score"               # the RewardModel protocol (ms_rm.rewards.base)
    input_kind = "pixels"
    format_name = FORMAT_NAME
    config_class = BLIPScoreConfig
    conversion = conversion

    def __init__(self, config: BLIPScoreConfig = BLIPScoreConfig(), dtype: ms.Type = ms.float32,
                 mode: str = "graph"):
        CompiledCell.__init__(self, mode)
        self.config = config
        with self.parameters_in(dtype):
            self.visual_encoder = VisionTransformer(config.vision)
            self.text_encoder = TextEncoder(config.text, None)                 # mode='text'
            self.vision_proj = Linear(config.vision.width, config.embed_dim)
            self.text_proj = Linear(config.text.width, config.embed_dim)
        self._init_transform()

    # --- the tensor program ------------------------------------------------------------------
    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Prompt tokens (B, L) -> normalised text features (B, P)."""
        text = self.text_encoder(input_ids, attention_mask)                           # (B, L, D)
        return unit(self.text_proj(text[:, 0]).astype(ms.float32))

    def image_features(self, pixels: Tensor) -> Tensor:
        """Normalised pixels (B, 3, S, S) -> normalised image features (B, P)."""
        image = self.visual_encoder(pixels.astype(self.compute_dtype))              # (B, N, E)
        return unit(self.vision_proj(image[:, 0]).astype(ms.float32))

    def construct(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor):
        """Normalised pixels (B, 3, S, S), tokens (B, L) -> image features (B, P), text features (B, P),
        score (B, 1)."""
        image = self.image_features(pixels)
        text = self.text_features(input_ids, attention_mask)
        return image, text, mint.sum(image * text, dim=-1, keepdim=True)

    def stages(self, pixels, input_ids, attention_mask) -> Dict[str, Tensor]:
        """image_features, text_features (normalised, (B, P)) and score of preprocessed pixels, by name."""
        image, text, score = self.run("construct", *self.prepare(pixels, input_ids, attention_mask))
        return {"image_features": image, "text_features": text, "score": score}
