"""The SD3 / SD3.5 VAE decoder: latents -> images, the decoder half of diffusers' AutoencoderKL.

    vae = load_vae_decoder("stable-diffusion-3.5-medium")        # the pipeline or its vae/ folder
    pixels = vae.decode(latents)         # (B, 16, h, w) scaled latents -> (B, 3, 8h, 8w) in [-1, 1]
    images = vae.to_images(latents)      # uint8 (B, 8h, 8w, 3), as the pipeline's "pil" output

diffusers 0.36 (models/autoencoders/vae.py `Decoder`, unet_2d_blocks.py `UpDecoderBlock2D`,
upsampling.py `Upsample2D`): z = latents / scaling_factor + shift_factor, [post_quant_conv],
conv_in -> mid block (resnet, attention, resnet) -> up blocks (layers + 1 resnets, then nearest 2x
upsampling and a 3x3 conv except after the last) -> GroupNorm, SiLU, conv_out; images are
(x / 2 + 0.5) clamped to [0, 1]. The blocks are ms_rm.vae.blocks; parameter
names are diffusers' (`decoder.up_blocks.0.upsamplers.0.conv.weight`, ...).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
from mindspore.nn.utils import no_init_parameters

from ..core import ops
from ..core.compiled import CompiledCell
from ..core.inputs import as_float_tensor, check_finite, check_shape
from .blocks import Conv2d, GroupNorm, UNetMidBlock2D, UpDecoderBlock2D
from .config import VAEConfig, load_vae_half

ENCODER_PREFIXES = ("encoder.", "quant_conv.")       # the encoder half: not read here


class Decoder(nn.Cell):
    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = list(reversed(config.block_out_channels))
        groups = config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(channels[0], groups, config.mid_block_add_attention)
        self.up_blocks = nn.CellList([
            UpDecoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups,
                             upsample=i < len(channels) - 1)
            for i in range(len(channels))])
        self.conv_norm_out = GroupNorm(groups, channels[-1])
        self.conv_out = Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def construct(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(x, pre_norm=self.conv_norm_out.prepare(x))


class VAEDecoder(CompiledCell):
    """Scaled latents (B, C, h, w) -> pixels (B, 3, H, W) in about [-1, 1]; differentiable."""

    def __init__(self, config: VAEConfig, dtype: ms.Type = ms.float32, mode: str = "graph"):
        super().__init__(mode)
        self.config = config
        self.compute_dtype = ops.compute_dtype(dtype)
        with no_init_parameters():
            self.decoder = Decoder(config)
            c = config.latent_channels
            self.post_quant_conv = Conv2d(c, c, 1) if config.use_post_quant_conv else None
        for param in self.get_parameters():
            param.set_dtype(self.compute_dtype)

    def construct(self, latents: Tensor) -> Tensor:
        z = latents.astype(ms.float32) / self.config.scaling_factor + self.config.shift_factor
        z = z.astype(self.compute_dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def check_latents(self, latents: Any) -> Tensor:
        latents = as_float_tensor(latents, "latents")
        check_shape(latents, "latents", (None, self.config.latent_channels, None, None), "= (B, latent channels, h, w)")
        check_finite(latents, "latents")
        return latents

    def decode(self, latents: Any) -> Tensor:
        """Pixels (B, 3, 8h, 8w), about [-1, 1] (the VAE's output, unclamped)."""
        return self.run("construct", self.check_latents(latents))

    def to_images(self, latents: Any) -> np.ndarray:
        """uint8 images (B, H, W, 3): (x / 2 + 0.5) clamped to [0, 1], times 255, rounded as
        diffusers' numpy_to_pil does ((x * 255).round())."""
        pixels = self.decode(latents).astype(ms.float32).asnumpy()
        images = np.clip(pixels / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
        return (images * 255).round().astype(np.uint8)


def load_vae_decoder(folder: str, dtype: ms.Type = ms.float32, mode: str = "graph") -> VAEDecoder:
    """The decoder of a diffusers `vae/` folder (or a pipeline folder holding one), strictly: every
    decoder (and post_quant_conv) tensor present with its shape; encoder.* and quant_conv.* declared
    unused; anything else an error."""
    return load_vae_half(folder, VAEDecoder, ENCODER_PREFIXES, "use_post_quant_conv, block_out_channels, "
                         "layers_per_block", dtype, mode)
