"""The SD3 / SD3.5 VAE (diffusers' AutoencoderKL): its config and folder (config), the blocks both
halves are built of (blocks), the encoder (images -> latents in the reward model's space) and the
decoder (latents -> images)."""

from .config import VAEConfig, read_vae_config
from .decoder import VAEDecoder, load_vae_decoder
from .encoder import VAEEncoder, load_vae_encoder

__all__ = ["VAEConfig", "read_vae_config", "VAEEncoder", "load_vae_encoder", "VAEDecoder", "load_vae_decoder"]
