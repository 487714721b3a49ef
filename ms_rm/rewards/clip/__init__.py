"""CLIP models (PickScore, CLIP score): transformers' CLIPModel in MindSpore, loaded from a
Hugging Face folder, with CLIPImageProcessor's preprocessing and CLIPTokenizer."""

from .config import CLIPConfig, ImageProcessing, load_clip_config, load_image_processing
from .loading import load_clip_model
from .model import CLIPModel
from .preprocess import load_tokenizer, pixel_values, resize_matrices, tokenize

__all__ = ["CLIPConfig", "CLIPModel", "ImageProcessing", "load_clip_config", "load_clip_model",
           "load_image_processing", "load_tokenizer", "pixel_values", "resize_matrices", "tokenize"]
