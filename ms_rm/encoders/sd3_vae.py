"""The SD3 / SD3.5 VAE encoder: images -> latents in the reward model's space.

    vae = load_vae_encoder("sd3.5-medium/vae")                  # or the pipeline folder
    latents = vae.encode(pixels)        # pixels (B, 3, H, W) in [-1, 1] -> (B, 16, H/8, W/8)

A reimplementation of the encoder half of diffusers' `AutoencoderKL` (diffusers 0.36:
models/autoencoders/vae.py `Encoder`, models/resnet.py `ResnetBlock2D`, models/downsampling.py
`Downsample2D`, models/unets/unet_2d_blocks.py `DownEncoderBlock2D` and `UNetMidBlock2D`, the
mid-block `Attention` with `AttnProcessor2_0`, and `DiagonalGaussianDistribution`):

    conv_in -> down blocks (resnets, then a stride-2 conv except after the last block)
            -> mid block (resnet, single-head self-attention, resnet)
            -> GroupNorm, SiLU, conv_out -> [quant_conv] -> moments (B, 2 * latent_channels, h, w)
    moments = (mean, logvar);  z = mean (the posterior's mode) or mean + exp(logvar / 2) * eps
    latents = (z - shift_factor) * scaling_factor

Attribute names follow diffusers, so the parameter names are the diffusers state-dict names
(`encoder.conv_in.weight`, `encoder.mid_block.attentions.0.to_q.weight`, `quant_conv.weight`, ...)
and loading is a name-for-name copy. The decoder is never built and its tensors are never read.
Shapes: B batch, C channels, H x W the current resolution, L = H * W positions.
"""

from __future__ import annotations


import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn
from mindspore.common.initializer import initializer
from mindspore.nn.utils import no_init_parameters

from ..core import ops
from ..core.compile_cache import jit
from ..core.compiled import CompiledCell
from ..core.errors import CheckpointError, ConfigError, InputError
from ..core.inputs import as_float_tensor, check_finite, check_shape, noise_input
from ..core.layers import Linear
from ..core.weights import check_key_sets, load_parameters
from ..io.files import find_weights, read_json
from ..io.safetensors_file import open_safetensors

logger = logging.getLogger(__name__)

NORM_EPS = 1e-6                      # every GroupNorm of diffusers' VAE encoder
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # DiagonalGaussianDistribution's clamp
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = WEIGHTS_NAME + ".index.json"
UNUSED_PREFIXES = {"decoder.": "the decoder: the reward model never decodes latents",
                   "post_quant_conv.": "the decoder's input convolution"}


# --- config ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VAEConfig:
    """The settings of a diffusers AutoencoderKL config.json that the encoder reads.

    Missing keys take diffusers' AutoencoderKL defaults (as `AutoencoderKL.from_config` does);
    shift_factor missing or null means 0.
    """

    in_channels: int = 3
    down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",)
    block_out_channels: Tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    force_upcast: bool = True
    use_quant_conv: bool = True
    mid_block_add_attention: bool = True
    out_channels: int = 3                   # the decoder's (ms_rm.generators.sd3_vae_decoder)
    up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",)
    use_post_quant_conv: bool = True

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each axis: 2 ** (number of down blocks - 1), 8 for SD3."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "vae config") -> "VAEConfig":
        """Validate a diffusers AutoencoderKL config; ConfigError naming the key otherwise."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")

        def fail(key: str, problem: str) -> ConfigError:
            return ConfigError(f"{source}: '{key}' {problem}")

        def get(key: str, default: Any) -> Any:
            return raw[key] if key in raw and raw[key] is not None else default

        def positive_int(key: str, default: int) -> int:
            value = get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise fail(key, f"must be a positive integer, got {value!r}")
            return value

        def number(key: str, default: float) -> float:
            value = get(key, default)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
                raise fail(key, f"must be a finite number, got {value!r}")
            return float(value)

        def flag(key: str, default: bool) -> bool:
            value = get(key, default)
            if not isinstance(value, bool):
                raise fail(key, f"must be true or false, got {value!r}")
            return value

        class_name = raw.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise fail("_class_name", f"is {class_name!r}: ms_rm implements the encoder of AutoencoderKL only "
                                      "(pass the SD3 pipeline's vae/ folder)")
        defaults = cls()
        channels = get("block_out_channels", defaults.block_out_channels)
        if (not isinstance(channels, (list, tuple)) or not channels
                or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels)):
            raise fail("block_out_channels", f"must be a non-empty list of positive integers, got {channels!r}")
        blocks = get("down_block_types", defaults.down_block_types)
        if not isinstance(blocks, (list, tuple)) or len(blocks) != len(channels):
            raise fail("down_block_types", f"must list one block per entry of block_out_channels "
                                           f"({len(channels)}), got {blocks!r}")
        unsupported = sorted({b for b in blocks if b != "DownEncoderBlock2D"}, key=str)
        if unsupported:
            raise fail("down_block_types", f"has {unsupported}: only DownEncoderBlock2D (the SD3 VAE's) is "
                                           "implemented")
        act_fn = get("act_fn", defaults.act_fn)
        if act_fn not in ("silu", "swish"):                 # diffusers' get_activation: swish is silu
            raise fail("act_fn", f"is {act_fn!r}: only 'silu' (the SD3 VAE's) is implemented")
        groups = positive_int("norm_num_groups", defaults.norm_num_groups)
        bad = [c for c in channels if c % groups]
        if bad:
            raise fail("norm_num_groups", f"({groups}) must divide every entry of block_out_channels, "
                                          f"not {bad}")
        up_blocks = get("up_block_types", ("UpDecoderBlock2D",) * len(channels))
        if not isinstance(up_blocks, (list, tuple)) or len(up_blocks) != len(channels) \
                or any(b != "UpDecoderBlock2D" for b in up_blocks):
            raise fail("up_block_types", f"must list UpDecoderBlock2D (the SD3 VAE's) once per entry of "
                                         f"block_out_channels ({len(channels)}), got {up_blocks!r}")
        for key in ("latents_mean", "latents_std"):
            if raw.get(key) is not None:
                raise fail(key, "is set: per-channel latent normalisation is not implemented (ms_rm maps "
                                "latents with shift_factor and scaling_factor only, as SD3 does)")
        config = cls(in_channels=positive_int("in_channels", defaults.in_channels),
                     down_block_types=tuple(blocks), block_out_channels=tuple(channels),
                     layers_per_block=positive_int("layers_per_block", defaults.layers_per_block),
                     act_fn="silu", latent_channels=positive_int("latent_channels", defaults.latent_channels),
                     norm_num_groups=groups, scaling_factor=number("scaling_factor", defaults.scaling_factor),
                     shift_factor=number("shift_factor", defaults.shift_factor),
                     force_upcast=flag("force_upcast", defaults.force_upcast),
                     use_quant_conv=flag("use_quant_conv", defaults.use_quant_conv),
                     out_channels=positive_int("out_channels", defaults.out_channels),
                     up_block_types=tuple(up_blocks),
                     use_post_quant_conv=flag("use_post_quant_conv", defaults.use_post_quant_conv),
                     mid_block_add_attention=flag("mid_block_add_attention", defaults.mid_block_add_attention))
        if config.scaling_factor == 0.0:
            raise fail("scaling_factor", "is 0: the latents would all be zero")
        return config


def read_vae_config(path: str) -> VAEConfig:
    """A vae config.json file, validated."""
    return VAEConfig.from_dict(read_json(path, "VAE config.json"), path)


# --- layers ------------------------------------------------------------------------------------

class Conv2d(nn.Cell):
    """torch.nn.Conv2d with a bias and square kernel: weight (out, in, k, k), bias (out,); spelt
    for the device it is built on (ops.use_cpu_spellings). pre_norm and residual: see ops.conv2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.stride, self.padding = stride, padding
        self.as_gemm = ops.use_cpu_spellings()
        self.weight = Parameter(initializer("zeros", (out_channels, in_channels, kernel_size, kernel_size),
                                            ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (out_channels,), ms.float32), name="bias")

    def construct(self, x: Tensor, pre_norm=None, residual: Optional[Tensor] = None) -> Tensor:
        return ops.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.as_gemm, pre_norm, residual)


class GroupNorm(nn.Cell):
    """torch.nn.GroupNorm(groups, channels, eps=1e-6, affine=True), computed in float32."""

    def __init__(self, groups: int, channels: int, eps: float = NORM_EPS):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = Parameter(initializer("ones", (channels,), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (channels,), ms.float32), name="bias")

    def construct(self, x: Tensor) -> Tensor:
        return ops.group_norm(x, self.groups, self.weight, self.bias, self.eps)

    def prepare(self, x: Tensor):
        """x's statistics and this norm's affine: a following Conv2d's `pre_norm`, which then
        convolves silu(self(x)) (on the CPU without ever holding it whole)."""
        return ops.group_statistics(x, self.groups, self.eps), self.weight, self.bias


class ResnetBlock2D(nn.Cell):
    """diffusers ResnetBlock2D without a time embedding (temb_channels=None, output_scale_factor 1):
    x + conv2(silu(norm2(conv1(silu(norm1(x)))))), the skip through a 1x1 conv when C changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def construct(self, x: Tensor) -> Tensor:
        h = self.conv1(x, pre_norm=self.norm1.prepare(x))                    # (B, C_out, H, W)
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return self.conv2(h, pre_norm=self.norm2.prepare(h), residual=skip)  # dropout: identity in eval


class Downsample2D(nn.Cell):
    """diffusers Downsample2D(use_conv=True, padding=0): zero-pad right and bottom by one, then a
    3x3 stride-2 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(ops.pad(x, (0, 1, 0, 1)))                           # (B, C, H+1, W+1) -> (B, C, H/2, W/2)


class DownEncoderBlock2D(nn.Cell):
    """`layers` resnets, then (all blocks but the last) a Downsample2D."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
                                    for i in range(layers)])
        self.downsamplers = nn.CellList([Downsample2D(out_channels)]) if downsample else None

    def construct(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)                                                    # (B, C_out, H, W)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)                                      # (B, C_out, H/2, W/2)
        return x


class SpatialSelfAttention(nn.Cell):
    """The mid block's diffusers Attention: GroupNorm, then single-head self-attention over the
    H*W positions with head dim C (attention_head_dim = channels), output projection, residual
    (residual_connection=True, rescale_output_factor 1).

    The scores (B, 1, L, L) float32 take 1 GiB per image at 1024 x 1024 pixels (L = 128 * 128),
    where torch's fused kernel streams them: with the CPU spellings they are made a chunk of
    queries at a time (ops.attention)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        # Index 1 is diffusers' dropout, kept so that the projection is named to_out.0.
        self.to_out = nn.CellList([Linear(channels, channels), nn.Identity()])
        self.chunked = ops.use_cpu_spellings()

    def construct(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = mint.swapaxes(self.group_norm(x).reshape(b, c, h * w), 1, 2)   # (B, L, C)
        one_head = (b, 1, h * w, c)
        q = self.to_q(tokens).reshape(one_head)                                  # (B, 1, L, C): one head
        k = self.to_k(tokens).reshape(one_head)
        v = self.to_v(tokens).reshape(one_head)
        out = self.to_out[0](ops.attention(q, k, v, chunked=self.chunked).reshape(b, h * w, c))   # (B, L, C)
        return mint.swapaxes(out, 1, 2).reshape(b, c, h, w) + x                  # (B, C, H, W)


class UNetMidBlock2D(nn.Cell):
    """resnet -> [attention] -> resnet at the lowest resolution (diffusers' num_layers=1)."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.CellList([SpatialSelfAttention(channels, groups)] if add_attention else [])
        self.add_attention = add_attention

    def construct(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        if self.add_attention:
            x = self.attentions[0](x)
        return self.resnets[1](x)


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


# --- the encoder object users call -------------------------------------------------------------

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
        does not reuse every intermediate: at 1024 x 1024 pixels 8.4 GiB instead of 11.5; README,
        "Performance")."""
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

def find_vae_folder(path: str) -> str:
    """The diffusers vae/ folder at `path`: the folder itself, or `path`/vae in a pipeline folder."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such folder: pass a diffusers vae/ folder (config.json + "
                              f"{WEIGHTS_NAME}) or the SD3 pipeline folder holding vae/")
    for folder in (os.path.join(path, "vae"), path):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    raise CheckpointError(f"{path}: holds neither config.json nor vae/config.json: pass a diffusers vae/ "
                          "folder or the SD3 pipeline folder holding vae/")


def load_vae_encoder(folder: str, dtype: ms.Type = ms.float32, mode: str = "graph") -> VAEEncoder:
    """The VAE encoder of a diffusers `vae/` folder (or a pipeline folder holding one), strictly.

    Reads config.json and diffusion_pytorch_model.safetensors (or its sharded .index.json).
    Every encoder parameter must be present with its shape and finite values; decoder.* and
    post_quant_conv.* are declared unused and not read; any other tensor is an error.
    """
    folder = find_vae_folder(folder)
    config = read_vae_config(os.path.join(folder, "config.json"))
    model = VAEEncoder(config, dtype=dtype, mode=mode)
    path = find_weights(folder, (WEIGHTS_INDEX_NAME, WEIGHTS_NAME), "a diffusers AutoencoderKL saved as safetensors")
    source = open_safetensors(path)
    try:
        names = [k for k in source.keys() if not k.startswith(tuple(UNUSED_PREFIXES))]
        params = {p.name: p for p in model.get_parameters()}
        check_key_sets(params, names, path,
                       hint=f"The file does not match {os.path.join(folder, 'config.json')}: pass the VAE "
                            "saved with this config (decoder.* and post_quant_conv.* are ignored)")
        for name, param in params.items():            # every shape before reading any value
            if tuple(source.shape(name)) != tuple(param.shape):
                raise CheckpointError(f"{path}: tensor '{name}' has shape {tuple(source.shape(name))}, the "
                                      f"config.json beside it builds {tuple(param.shape)}: the weights and "
                                      "config are from different VAEs")
        load_parameters(model, source.read, names, path)
    finally:
        source.close()
    skipped = len(source.keys()) - len(names)
    logger.info("loaded the VAE encoder from %s (%d tensors; %d decoder tensors not read)", path, len(names), skipped)
    return model
