"""The LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor, as
Flow-GRPO-MS's `aesthetic` scorer and ImageReward's Aesthetic baseline compute it): CLIP ViT-L/14
image features, L2-normalised, into an MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1, in MindSpore.

`Aesthetic` is the registered reward model "aesthetic" (ms_rm.rewards.REWARD_MODELS); its
converter (`ms-rm convert --reward aesthetic PTH CLIP_FOLDER --out OUT`) joins the predictor's `.pth`
and a transformers CLIP folder into one converted folder; ms_rm.scoring.aesthetic is the scorer.
"""

from .config import FORMAT_NAME, RELEASED_MLP_WIDTHS, AestheticConfig
from .model import Aesthetic

__all__ = ["Aesthetic", "AestheticConfig", "FORMAT_NAME", "RELEASED_MLP_WIDTHS"]
