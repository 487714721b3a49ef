"""Encoders that turn images and prompts into what a reward model reads: the SD3 VAE encoder
(sd3_vae), SD3 prompt encoding (sd3_prompts), and the scorer-facing SD3 encoders (sd3)."""

from .sd3 import MindOneSD3Encoder, SD3Encoder

__all__ = ["SD3Encoder", "MindOneSD3Encoder"]
