"""The SD3 / SD3.5 VAE's config (diffusers' AutoencoderKL config.json, validated) and its folder:
where the vae/ folder is, and the strict reading of one half's weights from it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Tuple

import numpy as np
import mindspore as ms
from mindspore import nn

from ..core.errors import CheckpointError, ConfigError
from ..core.weights import check_key_sets, load_parameters
from ..io.files import find_weights, read_json
from ..io.safetensors_file import open_safetensors

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = WEIGHTS_NAME + ".index.json"


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
    out_channels: int = 3                   # the decoder's (ms_rm.vae.decoder)
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


# --- the vae/ folder ------------------------------------------------------------------------------

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


def load_vae_half(folder: str, build: Callable[..., nn.Cell], unused_prefixes: Tuple[str, ...], hint: str,
                  dtype: ms.Type = ms.float32, mode: str = "graph") -> nn.Cell:
    """`build(config, dtype=, mode=)` for the config.json of a diffusers `vae/` folder (or a
    pipeline folder holding one), filled strictly from its safetensors (or their sharded
    .index.json): every parameter present with its shape (all shapes checked before any value is
    read) and finite values; the tensors under `unused_prefixes` (the other half) declared unused
    and never read; anything else an error, with `hint` after the config's path."""
    folder = find_vae_folder(folder)
    config_path = os.path.join(folder, "config.json")
    model = build(read_vae_config(config_path), dtype=dtype, mode=mode)
    path = find_weights(folder, (WEIGHTS_INDEX_NAME, WEIGHTS_NAME), "a diffusers AutoencoderKL saved as safetensors")
    source = open_safetensors(path)
    try:
        names = [k for k in source.keys() if not k.startswith(unused_prefixes)]
        params = {p.name: p for p in model.get_parameters()}
        check_key_sets(params, names, path, hint=f"The file does not match {config_path}: {hint}")
        for name, param in params.items():            # every shape before reading any value
            if tuple(source.shape(name)) != tuple(param.shape):
                raise CheckpointError(f"{path}: tensor '{name}' has shape {tuple(source.shape(name))}, the "
                                      f"config.json beside it builds {tuple(param.shape)}: the weights and "
                                      "config are from different VAEs")
        load_parameters(model, source.read, names, path)
        skipped = len(source.keys()) - len(names)
    finally:
        source.close()
    logger.info("loaded the VAE's %s from %s (%d tensors; %d of the other half not read)", type(model).__name__,
                path, len(names), skipped)
    return model
