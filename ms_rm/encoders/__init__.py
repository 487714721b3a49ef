"""Encoders that turn images and prompts into what a reward model reads: SD3 prompt encoding
(sd3_prompts, t5), and the scorer-facing SD3 encoders (sd3_encoder: ms_rm.vae's encoder plus the
prompt encoders)."""

from .sd3_encoder import MindOneSD3Encoder, SD3Encoder

__all__ = ["SD3Encoder", "MindOneSD3Encoder"]
