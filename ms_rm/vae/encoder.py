"""The SD3 / SD3.5 VAE encoder: images -> latents in the reward model's space.

    vae = load_vae_encoder("sd3.5-medium/vae")                  # or the pipeline folder
    latents = vae.encode(pixels)        # pixels (B, 3, H, W) in [-1, 1] -> (B, 16, H/8, W/8)

A reimplementation of the encoder half of diffusers' `AutoencoderKL` (diffusers 0.36:
models/autoencoders/vae.py `Encoder` and `DiagonalGaussianDistribution`; its blocks are
ms_rm.vae.blocks):

    conv_in -> down blocks (resnets, then a stride-2 conv except after the last block)
            -> mid block (resnet, single-head self-attention, resnet)
            -> GroupNorm, SiLU, conv_out -> [quant_conv] -> moments (B, 2 * latent_channels, h, w)
    moments = (mean, logvar);  z = mean (the posterior's mode) or mean + exp(logvar / 2) * eps
    latents = (z - shift_factor) * scaling_factor

Attribute names follow diffusers, so the parameter names are the diffusers state-dict names
(`encoder.conv_in.weight`, `encoder.mid_block.attentions.0.to_q.weight`, `quant_conv.weight`, ...)
and loading is a name-for-name copy. The decoder is never built and its tensors are never read.
Shapes: B batch, C channels, H x W the current resolution.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn
from mindspore.nn.utils import no_init_parameters

from ..core import ops
from ..core.compile_cache import jit
from ..core.compiled import CompiledCell
from ..core.errors import InputError
from ..core.inputs import as_float_tensor, check_finite, check_shape, noise_input
from ..core.weights import load_parameters
from .blocks import Conv2d, DownEncoderBlock2D, GroupNorm, UNetMidBlock2D
from .config import VAEConfig, load_vae_half

logger = logging.getLogger(__name__)

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # DiagonalGaussianDistribution's clamp
UNUSED_PREFIXES = {"decoder.": "the decoder: the reward model never decodes latents",
                   "post_quant_conv.": "the decoder's input convolution"}


class Encoder(nn.Cell):
    """diffusers' VAE Encoder with double_z: (B, in, H, W) -> moments (B, 2 * latent, H/f, W/f)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.CellList([
            DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups,
                               downsample=i < len(channels) - 1)
            for i in range(len(channels))])
        self.mid_block = UNetMidBlock2D(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, channels[-1])
        self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def stages(self) -> List[nn.Cell]:
        """The cells the input runs through before `output`, in order: conv_in, each down block's
        resnets and downsampler, the mid block's resnet, attention and resnet."""
        stages = [self.conv_in]
        for block in self.down_blocks:
            stages += list(block.resnets) + (list(block.downsamplers) if block.downsamplers is not None else [])
        mid = self.mid_block
        return stages + [mid.resnets[0]] + list(mid.attentions) + [mid.resnets[1]]

    def output(self, x: Tensor) -> Tensor:
        return self.conv_out(x, pre_norm=self.conv_norm_out.prepare(x))     # (B, 2 * latent, H/f, W/f)

    def construct(self, pixels: Tensor) -> Tensor:
        x = pixels
        for stage in self.stages():
            x = stage(x)                                                     # ... -> (B, C_last, H/f, W/f)
        return self.output(x)


class VAEEncoder(CompiledCell):
    """The encoder half of an AutoencoderKL, and the map to the reward model's latent space.

    Build it with `load_vae_encoder(folder)`, or `VAEEncoder(config)` followed by
    `load_state_dict`. Parameters start unallocated and are filled by one of those.

    dtype: the compute dtype asked for. With the config's `force_upcast` (true for SD3) the
    encoder computes in float32 whatever is asked (diffusers' meaning of force_upcast);
    otherwise bf16 becomes fp32 on the CPU (ops.compute_dtype). Latents come out in float32.
    mode: "graph" (each stage compiled once per input shape, see `construct`) or "pynative"
    (eager), same numbers.
    """

    def __init__(self, config: Any, dtype: ms.Type = ms.float32, mode: str = "graph"):
        super().__init__(mode)
        self.config: VAEConfig = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)
        if self.config.force_upcast and dtype != ms.float32:
            logger.info("the VAE config sets force_upcast: encoding in float32 instead of %s", dtype)
            dtype = ms.float32
        self.compute_dtype = ops.compute_dtype(dtype)
        with no_init_parameters():
            self.encoder = Encoder(self.config)
            latent2 = 2 * self.config.latent_channels
            self.quant_conv = Conv2d(latent2, latent2, 1) if self.config.use_quant_conv else None
        for param in self.get_parameters():
            param.set_dtype(self.compute_dtype)
        self._rng = np.random.default_rng()            # fresh noise when sampling without a seed
        self._stage_calls: Dict[int, jit] = {}          # graph mode: stage index -> its compiled call

    def load_state_dict(self, tensors: Mapping[str, Any], source: str = "state dict") -> None:
        """Fill every parameter from a name -> array mapping (diffusers names), strictly
        (weights.load_parameters); decoder.* and post_quant_conv.* entries are ignored."""
        names = [name for name in tensors if not name.startswith(tuple(UNUSED_PREFIXES))]
        load_parameters(self, lambda name: np.asarray(tensors[name]), names, source)

    # --- the tensor program ------------------------------------------------------------------
    def construct(self, pixels: Tensor) -> Tensor:
        """pixels (B, in, H, W) -> moments (B, 2 * latent, H/f, W/f) in float32: (mean, logvar).

        Runs on the host, stage by stage (Encoder.stages, then `head`). In graph mode each stage
        is compiled on its own rather than the whole encoder as one graph: the same numbers, and
        the peak memory of the largest stage instead of the whole graph's (the CPU graph executor
        does not reuse every intermediate; measured in docs/measurements.md)."""
        x = pixels.astype(self.compute_dtype)
        for index, stage in enumerate(self.encoder.stages()):
            if self.mode == "graph" and index not in self._stage_calls:
                self._stage_calls[index] = jit(stage.construct, stage, name=f"stage {index}")
            x = self._stage_calls[index](x) if self.mode == "graph" else stage(x)   # -> (B, C_last, H/f, W/f)
        return self.run("head", x)

    def head(self, x: Tensor) -> Tensor:
        """The last stage's activations -> moments, float32: the encoder's output layers, quant_conv."""
        moments = self.encoder.output(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments.astype(ms.float32)

    def to_latent_space(self, z: Tensor) -> Tensor:
        """A posterior draw z -> the reward model's latents: (z - shift_factor) * scaling_factor."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def mode_latents(self, moments: Tensor) -> Tensor:
        """The posterior's mode (its mean), scaled: (B, latent, H/f, W/f)."""
        mean, _ = mint.chunk(moments, 2, dim=1)
        return self.to_latent_space(mean)

    def sample_latents(self, moments: Tensor, noise: Tensor) -> Tensor:
        """A posterior sample mean + exp(logvar / 2) * noise (logvar clamped to [-30, 20]), scaled."""
        mean, logvar = mint.chunk(moments, 2, dim=1)
        std = ops.exp(0.5 * mint.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX))
        return self.to_latent_space(mean + std * noise)

    # --- public calls ------------------------------------------------------------------------
    def latent_shape(self, pixels_shape: Tuple[int, ...]) -> Tuple[int, int, int, int]:
        """(B, latent_channels, H/f, W/f) for pixels of shape (B, C, H, W)."""
        b, _, h, w = pixels_shape
        f = self.config.downsample_factor
        return b, self.config.latent_channels, h // f, w // f

    def check_pixels(self, pixels: Any, check_values: bool = True) -> Tensor:
        """pixels as a float tensor after checking its shape (and, by default, that it is finite)."""
        tensor = as_float_tensor(pixels, "pixels")
        check_shape(tensor, "pixels", (None, self.config.in_channels, None, None),
                    f"= (B, {self.config.in_channels}, H, W), an RGB batch in [-1, 1]")
        b, _, h, w = tensor.shape
        f = self.config.downsample_factor
        if b == 0 or h == 0 or w == 0:
            raise InputError(f"pixels is empty: shape {tuple(tensor.shape)}")
        if h % f or w % f:
            raise InputError(f"pixels height and width must be multiples of {f} (the VAE's downsampling "
                             f"factor), got {h}x{w}: resize or crop the images first")
        if check_values:
            check_finite(tensor, "pixels")
        return tensor

    def moments(self, pixels: Any, check_values: bool = True) -> Tensor:
        """The encoder's raw output (B, 2 * latent, H/f, W/f): posterior mean and logvar, float32."""
        return self(self.check_pixels(pixels, check_values))

    def encode(self, pixels: Any, sample: bool = False, seed: Optional[int] = None, noise: Any = None,
               check_values: bool = True) -> Tensor:
        """Latents (B, latent, H/f, W/f) in the reward model's space, float32, of pixels
        (B, 3, H, W) in [-1, 1] with H and W multiples of f (8 for SD3).

        sample=False: the posterior's mode (deterministic; `seed` is ignored). sample=True: a
        posterior draw with `noise` (B, latent, H/f, W/f) if given, else noise drawn on the host
        from np.random.default_rng(seed) (fresh when seed is None), device-independent.
        """
        pixels = self.check_pixels(pixels, check_values)
        if not sample:
            if noise is not None:
                raise InputError("noise was given with sample=False: pass sample=True to draw from the "
                                 "posterior, or drop noise to take its mode")
            return self.run("mode_latents", self.moments(pixels, check_values=False))
        shape = self.latent_shape(tuple(pixels.shape))
        if noise is not None:
            if seed is not None:
                raise InputError("pass either noise or seed, not both")
            eps = noise_input(noise, shape, check_values=check_values)
        else:
            eps = Tensor(self.draw_noise(shape, seed))
        return self.run("sample_latents", self.moments(pixels, check_values=False), eps)

    def draw_noise(self, shape: Tuple[int, ...], seed: Optional[int] = None) -> np.ndarray:
        """The posterior's standard normal noise for latents of `shape`, from np.random.default_rng(seed)
        (this encoder's own stream when seed is None), float32."""
        rng = np.random.default_rng(seed) if seed is not None else self._rng
        return rng.standard_normal(shape, dtype=np.float32)


# --- loading -----------------------------------------------------------------------------------

def load_vae_encoder(folder: str, dtype: ms.Type = ms.float32, mode: str = "graph") -> VAEEncoder:
    """The VAE encoder of a diffusers `vae/` folder (or a pipeline folder holding one), strictly.

    Reads config.json and diffusion_pytorch_model.safetensors (or its sharded .index.json).
    Every encoder parameter must be present with its shape and finite values; decoder.* and
    post_quant_conv.* are declared unused and not read; any other tensor is an error.
    """
    return load_vae_half(folder, VAEEncoder, tuple(UNUSED_PREFIXES), "pass the VAE saved with this config "
                         "(decoder.* and post_quant_conv.* are ignored)", dtype, mode)
