"""The BLIP score as a Flow-GRPO-MS scorer: `scorer(images, prompts) -> list[float]`, the cosine
of BLIP's image and text features (ms_rm.rewards.blip_score).

The package's BLIPScore preprocesses images and tokenizes prompts exactly as its ImageReward does
(the same `_transform(224)`, the same BLIP tokenizer at 35 tokens), so this is ImageReward's
scorer (ms_rm.scoring.imagereward) with the BLIP score's model: images (PIL, files, arrays, a
(B, 3, H, W) batch in [0, 1]) are resized and cropped as the package does, prompts tokenized from
a local bert-base-uncased folder; `inference_rank(prompt, images)` is the package's call of that
name; `reward_of_pixels(pixels, prompts)` the score of pixels in [0, 1], differentiable with
respect to them (ReFL, search).
"""

from __future__ import annotations

from ..rewards.blip_score import BLIPScore
from .imagereward import ImageRewardScorer


class BLIPScoreScorer(ImageRewardScorer):
    """checkpoint_path: a folder written by `ms-rm convert --reward blip-score` (or model=, a
    BLIPScore); tokenizer: the folder of bert-base-uncased's tokenizer (vocab.txt)."""

    name = "blip-score"
    input_kind = "pixels"
    model_class = BLIPScore
