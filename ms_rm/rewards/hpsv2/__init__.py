"""HPSv2 (the hpsv2 package, tgxs002/HPSv2): open_clip's ViT-H/14 CLIP fine-tuned on human
preferences, in ms_rm's CLIP towers; the converter of open_clip state dicts, hpsv2's image
preprocessing and open_clip's tokenizer, without open_clip or torch.

`HPSv2` is the registered reward model "hpsv2"; the scorer is ms_rm.scoring.hpsv2.HPSv2Scorer.
"""

from .config import FORMAT_NAME, VIT_H_14, clip_config
from .model import HPSv2
from .preprocess import pixel_values, resize_pad_matrices, resized_size
from .tokenizer import OpenCLIPTokenizer

__all__ = ["FORMAT_NAME", "HPSv2", "OpenCLIPTokenizer", "VIT_H_14", "clip_config", "pixel_values",
           "resize_pad_matrices", "resized_size"]
